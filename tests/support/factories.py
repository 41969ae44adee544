"""Small builders for tiers, prices and users used across tests."""

from __future__ import annotations

from decimal import Decimal
from itertools import count

from django.contrib.auth import get_user_model

from llm_quota.models import ModelPrice, Tier, UserQuota
from llm_quota.rules.accounting import Estimate, Price

_seq = count(1)


def price(model: str = "gpt-4o", inp: str = "1", out: str = "4", **extra) -> ModelPrice:
    return ModelPrice.objects.create(
        model=model, input_multiplier=Decimal(inp), output_multiplier=Decimal(out), **extra
    )


def tier(name: str | None = None, **limits) -> Tier:
    return Tier.objects.create(name=name or f"tier-{next(_seq)}", **limits)


def user(tier_obj: Tier | None = None, **quota):
    u = get_user_model().objects.create_user(f"user{next(_seq)}", password="pw-123456")
    if tier_obj is not None:
        UserQuota.objects.create(user=u, tier=tier_obj, **quota)
    return u


def estimate(prompt: int, output: int, inp: int = 1_000_000, out: int = 1_000_000) -> Estimate:
    return Estimate(Price("gpt-4o", inp, out), prompt, output)
