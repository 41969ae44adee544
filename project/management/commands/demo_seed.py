"""Seed the demo, idempotently: tiers, model prices, a superuser and two demo users."""

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from llm_quota.models import Tier, UserQuota

#: The free tier may use the cheap models only; pro may use every priced model.
FREE_MODELS = (
    "gpt-4o-mini\ngpt-4.1-mini\ngpt-4.1-nano\ngpt-5-mini\ngpt-5-nano\nclaude-haiku-4-5*\n"
    "text-embedding-3-small"
)

#: username, password, tier. Passwords are for the demo on 127.0.0.1 only.
USERS = [("alice", "alice", "free"), ("bob", "bob", "pro")]


class Command(BaseCommand):
    help = (
        "Create the demo tiers (free, pro), load the bundled OpenAI/Anthropic prices, "
        "and the users admin/admin (superuser), alice/alice (free) and bob/bob (pro)."
    )

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
        free, _ = Tier.objects.update_or_create(
            name="free",
            defaults=dict(
                requests_per_minute=10,
                tokens_per_minute=20_000,
                tokens_per_day=50_000,
                tokens_per_month=500_000,
                max_concurrent_requests=2,
                max_tokens_per_request=8_000,
                allowed_models=FREE_MODELS,
                upgrade_to=pro,
                upgrade_url="http://127.0.0.1:8000/upgrade/",
                is_default=True,
            ),
        )
        call_command("llm_quota_load_prices", bundled=True, stdout=self.stdout, stderr=self.stderr)
        User = get_user_model()
        if not User.objects.filter(username="admin").exists():
            User.objects.create_superuser("admin", "admin@example.com", "admin")
        tiers = {"free": free, "pro": pro}
        for username, password, tier in USERS:
            user = User.objects.filter(username=username).first()
            if user is None:
                user = User.objects.create_user(username, f"{username}@example.com", password)
            UserQuota.objects.update_or_create(user=user, defaults={"tier": tiers[tier]})
        self.stdout.write(
            self.style.SUCCESS(
                "Seeded tiers free (default) and pro, model prices, superuser admin/admin, "
                "users alice/alice (free) and bob/bob (pro)."
            )
        )
