"""The burn-rate breaker's side outside the scripts: who is paused, and resuming them.

The pause is decided and kept by ``reserve.lua`` in the user's own keys (``burn.lua``);
nothing here takes part in a decision. A trip is also listed in a sorted set per
kind of payer (``KeySpace.paused``, ``paused_keys``, ``paused_teams``) so the admin can
filter paused users, keys and teams without a round trip per row; a list may hold one
whose pause ended or was lifted elsewhere, so readers drop what has expired.
"""

from __future__ import annotations

import time
from typing import Any

from llm_quota.ledger import keys
from llm_quota.ledger.sync_driver import Ledger


def _now_ms(ledger: Ledger) -> int:
    return int((ledger.clock() if ledger.clock is not None else time.time()) * 1000)


def _listing(ledger: Ledger, kind: str) -> str:
    return {
        "user": ledger.keyspace.paused,
        "key": ledger.keyspace.paused_keys,
        "team": ledger.keyspace.paused_teams,
    }[kind]()


_ID = {"user": keys.user_id, "key": keys.api_key_id, "team": keys.api_key_id}


def list_paused(ledger: Ledger, user_id: Any, paused_seconds: float, kind: str = "user") -> None:
    """Add a tripped payer to its kind's paused list, until its pause ends: ``user_id``
    is the user's, the key's or the team's id, as ``kind`` says."""
    until = _now_ms(ledger) + int(paused_seconds * 1000)
    ledger.client.zadd(_listing(ledger, kind), {_ID[kind](user_id): until})


def paused_ids(ledger: Ledger, kind: str = "user") -> list[str]:
    """The users, keys or teams paused now (ended pauses are dropped on the way)."""
    key, now = _listing(ledger, kind), _now_ms(ledger)
    ledger.client.zremrangebyscore(key, "-inf", now)
    return [_ID[kind](uid.decode() if isinstance(uid, bytes) else uid)
            for uid in ledger.client.zrangebyscore(key, now + 1, "+inf")]  # fmt: skip


def paused_user_ids(ledger: Ledger) -> list[str]:
    """The users paused now."""
    return paused_ids(ledger, "user")


def resume(ledger: Ledger, user_id: Any) -> bool:
    """End the user's pause (staff); True if they were paused. The breaker waits one
    minute before it may trip again (``LedgerOps.burn_resume``)."""
    was_paused = bool(ledger.burn_resume(user_id))
    ledger.client.zrem(ledger.keyspace.paused(), keys.user_id(user_id))
    return was_paused


def resume_key(ledger: Ledger, user_id: Any, key_id: Any) -> bool:
    """End an API key's pause (staff), as ``resume`` a user's; True if it was paused.
    A key's breaker is its own: its user was never listed as paused for it."""
    was_paused = bool(ledger.key_burn_resume(user_id, key_id))
    ledger.client.zrem(ledger.keyspace.paused_keys(), keys.api_key_id(key_id))
    return was_paused


def resume_team(ledger: Ledger, team_id: Any) -> bool:
    """End a team's pause (staff), as ``resume`` a user's; True if it was paused."""
    was_paused = bool(ledger.team_burn_resume(team_id))
    ledger.client.zrem(ledger.keyspace.paused_teams(), keys.api_key_id(team_id))
    return was_paused
