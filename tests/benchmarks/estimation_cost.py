"""Section 6: what counting a prompt costs, against its byte-count bound."""

from __future__ import annotations

import time

from llm_quota.estimation import byte_bound, count_messages, load_encoding
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


def run(table) -> None:
    for size in (1_000, 10_000, 100_000, 1_000_000):
        messages = prompt_of(size)
        counted = count_messages(messages, "gpt-4o")
        exact = timed(lambda m=messages: count_messages(m, "gpt-4o"))
        bound = timed(lambda m=messages: byte_bound(m[0]["content"]))
        table.add(
            "6 estimation",
            f"count a {counted:,}-token prompt (gpt-4o)",
            f"{exact * 1e3:.2f} ms",
            f"byte bound: {bound * 1e3:.3f} ms",
        )
