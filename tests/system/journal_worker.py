"""Runs in its own process: calls that end while Redis is away, journaled to disk, then
it waits to be killed (``test_durable_journal``).

``python -m tests.system.journal_worker <redis port> <journal dir> <key prefix> <user pk>``.
It reserves ``METERED`` calls while Redis answers and says ``reserved``; on ``go`` (Redis
is down by then) it settles them, admits ``BLIND`` more blind and settles those, says
``charged <base tokens>`` and sleeps until SIGKILL.
"""

from __future__ import annotations

import os
import sys
import time

METERED, BLIND = 5, 5


def main(port: int, journal_dir: str, prefix: str, pk: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django
    from django.conf import settings

    django.setup()
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "JOURNAL_DIR": journal_dir,
        "BREAKER_COOLDOWN": 60.0,  # stays open: every settle after the first is journaled
        "FAIL_OPEN_DIVISOR": 1,
    }
    from llm_quota.conf import quota_settings

    quota_settings.reload()

    import redis

    from llm_quota.ledger import resilience
    from llm_quota.ledger.default import set_default_ledger
    from llm_quota.ledger.sync_driver import Ledger
    from llm_quota.quota import admission
    from llm_quota.rules.accounting import Estimate, Limits, Price

    client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    ledger = Ledger(client, prefix=prefix)
    set_default_ledger(ledger)
    price = Price("gpt-4o", 1_000_000, 4_000_000)
    limits = Limits(requests_per_minute=1000, tokens_per_month=10**9)
    estimate = Estimate(price, 10, 20)

    held = [ledger.reserve(pk, limits, estimate).reservation for _ in range(METERED)]
    print("reserved", flush=True)
    sys.stdin.readline()  # "go": Redis was killed meanwhile

    charged = 0
    for n, reservation in enumerate(held):
        admission.settle(reservation, {"prompt_tokens": 10, "completion_tokens": n}, ledger=ledger)
        charged += 10 + 4 * n
    for n in range(BLIND):
        blind = resilience.outage().admit_blind(pk, limits, estimate, ledger)
        admission.settle(blind, {"prompt_tokens": 10, "completion_tokens": 10 + n}, ledger=ledger)
        charged += 10 + 4 * (10 + n)
    assert len(resilience.outage().journal) == METERED + BLIND
    print("charged", charged, flush=True)
    time.sleep(600)  # until SIGKILL


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
