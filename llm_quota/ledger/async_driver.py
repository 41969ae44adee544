"""The ledger for asyncio: ASGI views, async workers, ``async with quota_guard``.

It runs the very plans of ``ledger_ops.py`` that the sync ``Ledger`` runs (same Lua
scripts, same arguments, same reading of the replies); only the sending differs:
``redis.asyncio`` instead of redis-py, so a gated request never ties up a thread
while it waits for Redis.

``get_async_ledger()`` mirrors the project's sync ledger (its Redis, prefix, TTL,
time zone, clock and restore source), one per event loop: redis.asyncio connections
belong to the loop that opened them.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async

from llm_quota.ledger.connections import ASYNC_POOL_SIZE, async_client_like
from llm_quota.ledger.ops import SCRIPTS, LedgerOps, LoadMonth, Plan, ScriptCall, script_source
from llm_quota.ledger.replies import (
    Decision,
    GlobalUsage,
    PeriodReset,
    Reservation,
    RestoreSource,
    Settlement,
    UserUsage,
)
from llm_quota.ledger.sync_driver import Ledger, is_cluster_client
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits


class AsyncLedger:
    """``Ledger``'s operations as coroutines, on a ``redis.asyncio`` client."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "llmq",
        reservation_ttl: float = 600,
        timezone: str = "UTC",
        clock: Callable[[], float] | None = None,
        restore: RestoreSource | None = None,
        cluster: bool | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.client = client
        self.cluster = is_cluster_client(client) if cluster is None else cluster
        self.ops = LedgerOps(
            prefix=prefix,
            reservation_ttl=reservation_ttl,
            timezone=timezone,
            clock=clock,
            cluster=self.cluster,
        )
        self.keyspace = self.ops.keyspace
        self.restore_source = restore
        self._mirrors: weakref.ref[Ledger] | None = None
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}
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
            cluster=ledger.cluster,
        )
        twin._mirrors = weakref.ref(ledger)  # weak: twins are cached by their ledger
        return twin

    @property
    def mirrors(self) -> Ledger | None:
        """The sync ledger this one was built from, if any."""
        return self._mirrors() if self._mirrors is not None else None

    # -- the executor ------------------------------------------------------------------

    async def _run(self, plan: Plan[Any]) -> Any:
        """Send each step of ``plan`` and hand it the reply, or throw it the error.

        A cancellation is thrown into the plan too, so a half-done cluster reserve can
        withdraw its first step before the task ends.
        """
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = plan.send(reply) if error is None else plan.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                reply = await self._perform(step)
            except BaseException as exc:
                error = exc

    async def _perform(self, step: ScriptCall | LoadMonth) -> Any:
        if isinstance(step, LoadMonth):
            if self.restore_source is None:
                return 0, []
            # The restore source reads the ORM: off the event loop, as Django's own
            # async ORM methods do.
            return await sync_to_async(self.restore_source)(step.user_id, step.month)
        if not self._ready:
            await self._connect()
        async with self._in_flight:
            return await self._scripts[step.script](keys=list(step.keys), args=list(step.args))

    # -- the operations (see LedgerOps for what each does) -------------------------------

    async def reserve(
        self,
        user_id: Any,
        limits: Limits,
        estimate: Estimate,
        *,
        clamp: bool = True,
        min_output_tokens: int = 16,
        probe_prompt_tokens: int | None = None,
        probe_clamp: bool = True,
    ) -> Decision:
        return await self._run(
            self.ops.reserve(
                user_id,
                limits,
                estimate,
                clamp=clamp,
                min_output_tokens=min_output_tokens,
                probe_prompt_tokens=probe_prompt_tokens,
                probe_clamp=probe_clamp,
            )  # fmt: skip
        )

    async def settle(self, reservation: Reservation, usage: ActualUsage) -> Settlement:
        return await self._run(self.ops.settle(reservation, usage))

    async def release(self, reservation: Reservation) -> bool:
        return await self._run(self.ops.release(reservation))

    async def usage(self, user_id: Any) -> UserUsage:
        return await self._run(
            self.ops.usage(user_id, restore_lost=self.restore_source is not None)
        )

    async def global_usage(self) -> GlobalUsage:
        return await self._run(self.ops.global_usage())

    async def restore(self, user_id: Any, month: str) -> bool:
        return await self._run(self.ops.restore(user_id, month))

    async def reset_period(self, user_id: Any) -> PeriodReset:
        return await self._run(self.ops.reset_period(user_id))

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
