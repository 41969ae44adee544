"""Section 6: what counting a prompt costs, against its byte-count bound, and what
admitting a huge prompt costs when its bounds decide (``admission.admit_request``): far
under the budget it is reserved on the byte bound, far over it is refused on the
lower bound; neither tokenizes it."""

from __future__ import annotations

import time
import uuid

from django_redis import get_redis_connection

from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import admission
from llm_quota.rules.accounting import Limits, Price
from llm_quota.rules.estimation import bound_prompt, count_messages, load_encoding, prompt_bounds
from tests.benchmarks.measure import median_of

PARAGRAPH = (
    "The quarterly report shows revenue growth of 12% across all regions, driven by "
    "enterprise renewals; costs rose 4%, mostly in compute. Next steps: hire two SREs, "
    "renegotiate the CDN contract, and ship the billing dashboard before March. "
)


def prompt_of(tokens: int) -> list[dict[str, str]]:
    enc = load_encoding("o200k_base")
    per = len(enc.encode(PARAGRAPH)) if enc is not None else len(PARAGRAPH)
    return [{"role": "user", "content": PARAGRAPH * max(1, tokens // per)}]


def timed(fn) -> float:
    def once() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return median_of(once, runs=3)


def admitted_on_bounds(ledger: Ledger, messages, budget: int) -> tuple[bool, bool]:
    """The lazy path of ``admission.admit_request`` on the ledger: (allowed, surely refused)."""
    price = Price("gpt-4o", 1_000_000, 4_000_000)
    estimate, lower = admission._bounded(price, bound_prompt(messages, "gpt-4o"), 100)
    decision = ledger.reserve(
        1, Limits(tokens_per_month=budget), estimate, clamp=False, probe_prompt_tokens=lower
    )
    if decision.reservation is not None:
        ledger.release(decision.reservation)
    return decision.allowed, decision.probe_limit is not None


def run(table) -> None:
    client = get_redis_connection("default")
    ledger = Ledger(client, prefix=f"bench{uuid.uuid4().hex[:8]}")
    for size in (1_000, 10_000, 100_000, 1_000_000):
        messages = prompt_of(size)
        counted = count_messages(messages, "gpt-4o")
        exact = timed(lambda m=messages: count_messages(m, "gpt-4o"))
        bounds = timed(lambda m=messages: prompt_bounds(m))
        table.add(
            "6 estimation",
            f"count a {counted:,}-token prompt (gpt-4o)",
            f"{exact * 1e3:.2f} ms",
            f"both bounds: {bounds * 1e3:.3f} ms",
        )
        lower, upper = prompt_bounds(messages)
        if upper <= admission.LAZY_COUNT_ABOVE:
            continue  # counted: cheaper than a second round trip could save
        for label, budget, expect in (
            ("far under the budget: admitted on the byte bound", 10**12, (True, False)),
            ("far over the budget: refused on the lower bound", lower // 2, (False, True)),
        ):
            outcome = admitted_on_bounds(ledger, messages, budget)
            cost = timed(lambda m=messages, b=budget: admitted_on_bounds(ledger, m, b))
            table.add(
                "6 estimation",
                f"  {label}",
                f"{cost * 1e3:.2f} ms",
                f"{exact / cost:,.0f}x cheaper than counting (bounds + Redis"
                f"{' + release' if expect[0] else ''}); "
                f"uncounted: {'met' if outcome == expect else 'NOT met'}",
            )
