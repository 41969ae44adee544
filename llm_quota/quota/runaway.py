"""The burn-rate breaker's side outside the scripts: who is paused, and resuming them.

The pause is decided and kept by ``reserve.lua`` in the user's own keys (``burn.lua``);
nothing here takes part in a decision. A trip is also listed in one sorted set
(``KeySpace.paused``) so the admin can filter paused users without a round trip per
user; the list may hold a user whose pause ended or was lifted elsewhere, so readers
drop what has expired.
"""

from __future__ import annotations

import time
from typing import Any

from llm_quota.ledger import keys
from llm_quota.ledger.sync_driver import Ledger


def _now_ms(ledger: Ledger) -> int:
    return int((ledger.clock() if ledger.clock is not None else time.time()) * 1000)


def list_paused(ledger: Ledger, user_id: Any, paused_seconds: float) -> None:
    """Add a tripped user to the paused list, until their pause ends."""
    until = _now_ms(ledger) + int(paused_seconds * 1000)
    ledger.client.zadd(ledger.keyspace.paused(), {keys.user_id(user_id): until})


def paused_user_ids(ledger: Ledger) -> list[str]:
    """The users paused now (ended pauses are dropped from the list on the way)."""
    key, now = ledger.keyspace.paused(), _now_ms(ledger)
    ledger.client.zremrangebyscore(key, "-inf", now)
    return [keys.user_id(uid.decode() if isinstance(uid, bytes) else uid)
            for uid in ledger.client.zrangebyscore(key, now + 1, "+inf")]  # fmt: skip


def resume(ledger: Ledger, user_id: Any) -> bool:
    """End the user's pause (staff); True if they were paused. The breaker waits one
    minute before it may trip again (``LedgerOps.burn_resume``)."""
    was_paused = bool(ledger.burn_resume(user_id))
    ledger.client.zrem(ledger.keyspace.paused(), keys.user_id(user_id))
    return was_paused


def resume_key(ledger: Ledger, user_id: Any, key_id: Any) -> bool:
    """End an API key's pause (staff), as ``resume`` a user's; True if it was paused.
    A key's breaker is its own: its user was never listed as paused for it."""
    return bool(ledger.key_burn_resume(user_id, key_id))


def resume_team(ledger: Ledger, team_id: Any) -> bool:
    """End a team's pause (staff), as ``resume`` a user's; True if it was paused."""
    return bool(ledger.team_burn_resume(team_id))
