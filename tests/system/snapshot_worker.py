"""Runs in a spawned process: settles while the parent's snapshot run is going.

Kept free of Django (as ``concurrency_worker.py``), so it shares nothing with the
parent but the Redis server.
"""

from __future__ import annotations

import redis

from llm_quota.ledger.sync_driver import Ledger
from tests.support.spend import spend


def settle_each(url: str, prefix: str, now: float, user_ids: list[int]) -> None:
    """One admitted and settled request per user, at the pinned time ``now``."""
    ledger = Ledger(redis.Redis.from_url(url), prefix=prefix, clock=lambda: now)
    for uid in user_ids:
        spend(uid, 300, 30, ledger=ledger)
