"""Seed the demo: two tiers, a few model prices and a superuser, idempotently."""

from decimal import Decimal

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from llm_quota.models import ModelPrice, Tier

# Multipliers: base tokens per token, with 1 base token = $2.50 per million
# (gpt-4o input). Derived from public per-million prices in USD.
PRICES = [
    ("gpt-4o", "1", "4", "0.5", "o200k_base", 4096, 128000),
    ("gpt-4o-mini", "0.06", "0.24", "0.03", "o200k_base", 4096, 128000),
    ("gpt-4.1", "0.8", "3.2", "0.2", "o200k_base", 4096, 1047576),
    ("claude-sonnet-4-5", "1.2", "6", "0.12", "", 4096, 200000),
    ("*", "1", "4", None, "", 1024, None),
]


class Command(BaseCommand):
    help = "Create the demo tiers (free, pro), model prices and the admin/admin superuser."

    def handle(self, *args, **options):
        pro, _ = Tier.objects.update_or_create(
            name="pro",
            defaults=dict(
                requests_per_minute=120,
                tokens_per_minute=200_000,
                tokens_per_day=2_000_000,
                tokens_per_month=20_000_000,
                max_concurrent_requests=16,
                max_tokens_per_request=64_000,
                is_default=False,
            ),
        )
        Tier.objects.update_or_create(
            name="free",
            defaults=dict(
                requests_per_minute=10,
                tokens_per_minute=20_000,
                tokens_per_day=50_000,
                tokens_per_month=500_000,
                max_concurrent_requests=2,
                max_tokens_per_request=8_000,
                allowed_models="gpt-4o-mini\ngpt-4o",
                upgrade_to=pro,
                upgrade_url="http://127.0.0.1:8000/upgrade/",
                is_default=True,
            ),
        )
        for model, inp, out, cached, encoding, max_out, window in PRICES:
            ModelPrice.objects.update_or_create(
                model=model,
                defaults=dict(
                    input_multiplier=Decimal(inp),
                    output_multiplier=Decimal(out),
                    cached_input_multiplier=Decimal(cached) if cached else None,
                    encoding=encoding,
                    default_max_output_tokens=max_out,
                    context_window=window,
                ),
            )
        User = get_user_model()
        if not User.objects.filter(username="admin").exists():
            User.objects.create_superuser("admin", "admin@example.com", "admin")
        self.stdout.write(
            self.style.SUCCESS(
                f"Seeded tiers free (default) and pro, {len(PRICES)} model prices, "
                "superuser admin/admin."
            )
        )
