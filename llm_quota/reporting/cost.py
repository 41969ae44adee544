"""What base tokens cost in dollars, for the usage API, the admin and the CSV export."""

from __future__ import annotations

from decimal import Decimal

from llm_quota.conf import quota_settings

_MICRO_USD = Decimal("0.000001")


def cost_usd(base_tokens: int) -> Decimal:
    """Dollars for ``base_tokens`` at ``BASE_TOKEN_USD_PER_MILLION``, to the micro-dollar."""
    rate = Decimal(str(quota_settings.BASE_TOKEN_USD_PER_MILLION))
    return (Decimal(int(base_tokens)) * rate / Decimal(1_000_000)).quantize(_MICRO_USD)
