"""The rate-limit headers of a gated response, from the ledger's ``Decision``.

Two vocabularies, because clients read one or the other:

- OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets written
  as Go durations ("1s", "6m0s", "250ms") as OpenAI sends them, which the SDKs and
  dashboards already parse;
- the IETF httpapi draft's ``RateLimit-Policy`` / ``RateLimit`` (draft-ietf-httpapi-
  ratelimit-headers-10, structured-field lists):
  ``RateLimit-Policy: "requests";q=60;w=60, "tokens";q=20000;w=60;qu="tokens"`` and
  ``RateLimit: "requests";r=59;t=60, "tokens";r=19000;t=60``. ``t`` is whole seconds,
  rounded up, like ``Retry-After``. The draft registers request-based quota units
  only, so the token policy names its unit ``"tokens"`` (base tokens).

The requests headers describe the sliding 60-second request window; the tokens
headers the token limit with the least remaining (base tokens per minute, day or
month; contract section 6), so a tier with only a monthly budget still shows what is
left, its ``w`` the length of that period. A limit the tier does not set (unlimited)
is left out rather than invented.
"""

from __future__ import annotations

import math
from typing import Any

from llm_quota.exceptions import BudgetExceeded, QuotaExceeded

WINDOW_SECONDS = 60

#: Added when ``CLAMP_MAX_TOKENS`` lowered the output cap sent upstream.
CLAMPED_HEADER = "x-llm-quota-max-tokens"


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes it: "17ms", "1s", "1m30s", "6m0s"."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes:
        hours, minutes = divmod(int(minutes), 60)
        text = f"{minutes}m{text}"
        if hours:
            text = f"{hours}h{text}"
    return text


def headers_for(decision: Any, *, max_tokens: int | None = None) -> dict[str, str]:
    """Every rate-limit header a response to ``decision`` carries (may be empty).

    ``max_tokens`` is the cap sent upstream when it differs from the decision's (one
    cap per choice when ``n`` > 1).
    """
    if decision is None:
        return {}
    headers: dict[str, str] = {}
    policies: list[str] = []
    states: list[str] = []
    windows = (
        ("requests", decision.requests_limit, decision.requests_remaining,
         decision.requests_reset, WINDOW_SECONDS, ""),
        ("tokens", decision.tokens_limit, decision.tokens_remaining,
         decision.tokens_reset, round(getattr(decision, "tokens_window", WINDOW_SECONDS)),
         ';qu="tokens"'),
    )  # fmt: skip
    for name, limit, remaining, reset, window, unit in windows:
        if limit is None:
            continue
        remaining = max(0, int(remaining or 0))
        headers[f"x-ratelimit-limit-{name}"] = str(limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(remaining)
        headers[f"x-ratelimit-reset-{name}"] = go_duration(reset)
        policies.append(f'"{name}";q={limit};w={window}{unit}')
        states.append(f'"{name}";r={remaining};t={max(0, math.ceil(reset))}')
    if policies:
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(states)
    if getattr(decision, "clamped", False):
        headers[CLAMPED_HEADER] = str(decision.max_tokens if max_tokens is None else max_tokens)
    return headers


def refusal_headers(exc: QuotaExceeded) -> dict[str, str]:
    """The headers of a 429: the rate-limit headers of the refusing decision,
    ``Retry-After`` (whole seconds, rounded up) and, for a budget, ``x-should-retry:
    false``, which the OpenAI SDKs obey: waiting out a day or a month is not a retry."""
    headers = headers_for(exc.decision)
    headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, BudgetExceeded):
        headers["x-should-retry"] = "false"
    return headers
