"""The ledger on ``redis.asyncio``, for ASGI views, async workers and
``async with quota_guard``: a gated request never ties up a thread while it waits
for Redis. It runs the very plans of ``ops.py`` that the sync ``Ledger`` runs; only
the sending differs.

``twin_of(ledger)`` mirrors a sync ledger (its Redis, prefix, TTL, time zone, clock
and restore source), one per event loop: redis.asyncio connections belong to the
loop that opened them.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from asgiref.sync import sync_to_async

from llm_quota.ledger.connections import ASYNC_POOL_SIZE, async_client_like
from llm_quota.ledger.operations import LedgerOperations
from llm_quota.ledger.plans import LoadMonth, LoadTeamMonth, Plan, ScriptCall, adrive
from llm_quota.ledger.sync_driver import Ledger


class AsyncLedger(LedgerOperations):
    """The ledger on ``redis.asyncio``: each operation returns a coroutine."""

    def __init__(self, client: Any, *, max_in_flight: int | None = None, **options: Any) -> None:
        super().__init__(client, **options)
        self._mirrors: weakref.ref[Ledger] | None = None
        # redis.asyncio's cluster client raises MaxConnectionsError past 100 commands in
        # flight per node (it cannot wait for a free connection), which the gate would
        # take for an outage; so callers past this many wait here instead.
        self._in_flight = asyncio.Semaphore(max_in_flight or ASYNC_POOL_SIZE)
        self._ready = not self.cluster
        self._ready_lock = asyncio.Lock()

    async def _connect(self) -> None:
        """A cluster client reads its slot map once, before the first burst of calls:
        redis.asyncio races when many first calls find it unread."""
        async with self._ready_lock:
            if not self._ready:
                await self.client.initialize()
                self._ready = True

    @classmethod
    def mirroring(cls, ledger: Ledger, client: Any = None) -> AsyncLedger:
        """The async twin of ``ledger``: same Redis (unless ``client`` is given), same
        prefix, TTL, time zone, clock and restore source."""
        twin = cls(
            client if client is not None else async_client_like(ledger.client),
            prefix=ledger.keyspace.prefix,
            reservation_ttl=ledger.ttl_ms / 1000,
            timezone=ledger.timezone,
            clock=ledger.clock,
            restore=ledger.restore_source,
            restore_keys=ledger.restore_keys_source,
            restore_teams=ledger.restore_teams_source,
            cluster=ledger.cluster,
        )
        twin._mirrors = weakref.ref(ledger)  # weak: twins are cached by their ledger
        return twin

    @property
    def mirrors(self) -> Ledger | None:
        """The sync ledger this one was built from, if any."""
        return self._mirrors() if self._mirrors is not None else None

    def _run(self, plan: Plan[Any]) -> Any:
        return adrive(plan, self.perform)

    async def perform(self, step: ScriptCall | LoadMonth | LoadTeamMonth) -> Any:
        if isinstance(step, LoadTeamMonth):
            team_source = self.restore_teams_source
            if team_source is None:
                return None
            return await sync_to_async(team_source)(step.team, step.month)
        if isinstance(step, LoadMonth):
            if step.api_keys:
                source = self.restore_keys_source
                return (
                    [] if source is None else await sync_to_async(source)(step.user_id, step.month)
                )
            if self.restore_source is None:
                return 0, []
            # The restore source reads the ORM: off the event loop, as Django's own
            # async ORM methods do.
            return await sync_to_async(self.restore_source)(step.user_id, step.month)
        if not self._ready:
            await self._connect()
        async with self._in_flight:
            return await self._scripts[step.script](keys=list(step.keys), args=list(step.args))

    async def aclose(self) -> None:
        await self.client.aclose()


# -- the project's async ledger ------------------------------------------------------

#: Per event loop, the twin of each sync ledger (weakly held on both sides).
_twins: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Ledger, AsyncLedger]
] = weakref.WeakKeyDictionary()


def twin_of(ledger: Ledger) -> AsyncLedger:
    """The running loop's async twin of ``ledger``, built once per loop and ledger."""
    per_ledger = _twins.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
    twin = per_ledger.get(ledger)
    if twin is None:
        twin = per_ledger[ledger] = AsyncLedger.mirroring(ledger)
    return twin
