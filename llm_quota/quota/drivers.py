"""Run the quota's plans: synchronously (``run``) or on an event loop (``arun``).

Admission, settlement and release are plans (``ledger/plans.py``) that decide
everything; these drivers only wait. Besides the ledger's own steps a plan may ask for:

- ``Blocking``: a call that may block (the ORM on a cache miss, tokenizing a long
  text). Sync code calls it; async code runs it in a thread, off the loop.
- ``Notify``: a Django signal. Sync code ``send``s it; async code ``asend``s it, so
  sync receivers run off the loop.
- ``Shielded``: a sub-plan that must run to its end once started (a reserve: Redis
  may admit it whether or not anyone waits for the answer). On a loop it runs as a
  task of its own behind ``asyncio.shield``, and what it gained for a caller who was
  cancelled meanwhile is given back through ``orphan``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.dispatch import Signal

from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.default import current_ledger, get_async_ledger, get_ledger
from llm_quota.ledger.plans import (
    LoadMonth,
    LoadTeamMonth,
    Plan,
    ScriptCall,
    UseLedger,
    adrive,
    drive,
)
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import pooled_connections

T = TypeVar("T")

#: Steps the ledger itself performs (a tuple: the cheapest ``isinstance`` check).
_LEDGER_STEPS = (ScriptCall, LoadMonth, LoadTeamMonth)


@dataclass(frozen=True)
class Blocking:
    """Call ``function(*args, **kwargs)``; async code does so in a thread."""

    function: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Django's rule: ORM code stays in the one thread for sync code (True); pure CPU
    #: work (tokenizing) may run in any thread (False).
    thread_sensitive: bool = True
    #: Async code may call it on the loop when this says so (a short text to count):
    #: a thread hop would cost more than the work.
    inline: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Notify:
    """Send ``signal`` with ``kwargs`` (``sender`` among them)."""

    signal: Signal
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Shielded:
    """Run ``plan`` to its end even if the caller is cancelled; ``orphan(result)``
    is the plan that undoes what a cancelled caller gained (or None)."""

    plan: Plan[Any]
    orphan: Callable[[Any], Plan[Any] | None]


def run(plan: Plan[T], ledger: Ledger | None = None) -> T:
    """Run ``plan`` here, on ``ledger`` (else the project's ledger, built on first use)."""
    performer = _Sync(ledger)
    return drive(plan, performer.perform)


async def arun(plan: Plan[T], ledger: AsyncLedger | None = None) -> T:
    """Run ``plan`` on the running event loop, on ``ledger`` (else the project's)."""
    performer = _Async(ledger)
    return await adrive(plan, performer.perform)


class _Sync:
    def __init__(self, ledger: Ledger | None) -> None:
        self.ledger = ledger

    def use_ledger(self) -> Ledger:
        if self.ledger is None:
            self.ledger = get_ledger()
        return self.ledger

    def perform(self, step: Any) -> Any:
        if isinstance(step, _LEDGER_STEPS):
            return self.use_ledger().perform(step)
        if isinstance(step, Blocking):
            return step.function(*step.args, **step.kwargs)
        if isinstance(step, UseLedger):
            return self.use_ledger() if step.build else self.ledger or current_ledger()
        if isinstance(step, Notify):
            return step.signal.send(**step.kwargs)
        if isinstance(step, Shielded):
            return drive(step.plan, self.perform)
        raise TypeError(f"unknown step {step!r}")


class SyncWork:
    """Whether a request's plans ran sync code in its thread (the ORM, a signal's sync
    receivers), and so may hold a database connection there."""

    ran = False


_sync_work: ContextVar[SyncWork | None] = ContextVar("llmq_sync_work", default=None)


def track_sync_work() -> SyncWork:
    """Start recording, for this request (its task and the tasks it starts)."""
    work = SyncWork()
    _sync_work.set(work)
    return work


def sync_work() -> SyncWork | None:
    """What this request recorded, or None when nothing was recording."""
    return _sync_work.get()


def _ran_sync() -> None:
    work = _sync_work.get()
    if work is not None:
        work.ran = True


def _handing_back(function: Callable[..., T]) -> Callable[..., T]:
    """``function``, then this thread's pooled connections back to their pools, in the
    same hop: the loop goes on (admission, the upstream call) without holding one, and a
    loop running late under load does not keep the pool from the requests waiting on
    it (``pooled_connections``)."""

    @functools.wraps(function)
    def step(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        finally:
            if pooled_connections.pooled():
                pooled_connections.hand_back()

    return step


#: Undoing plans of cancelled callers, kept until they finish (the event loop holds
#: only weak references to tasks).
_orphans: set[asyncio.Task[Any]] = set()


class _Async:
    def __init__(self, ledger: AsyncLedger | None) -> None:
        self.ledger = ledger

    async def use_ledger(self) -> AsyncLedger:
        if self.ledger is None:
            self.ledger = await get_async_ledger()
        return self.ledger

    async def perform(self, step: Any) -> Any:
        if isinstance(step, _LEDGER_STEPS):
            if not isinstance(step, ScriptCall):
                # A restore reads the database in the request's thread (the ledger's own
                # hop): the request's end must hand that connection back.
                _ran_sync()
            return await (await self.use_ledger()).perform(step)
        if isinstance(step, Blocking):
            if step.inline is not None and step.inline():
                return step.function(*step.args, **step.kwargs)
            function = step.function
            if step.thread_sensitive:
                function = _handing_back(function)
            call = sync_to_async(function, thread_sensitive=step.thread_sensitive)
            return await call(*step.args, **step.kwargs)
        if isinstance(step, UseLedger):
            return await self.use_ledger() if step.build else self.ledger or current_ledger()
        if isinstance(step, Notify):
            _ran_sync()  # its sync receivers run in the request's thread
            return await step.signal.asend(**step.kwargs)
        if isinstance(step, Shielded):
            return await self.shielded(step)
        raise TypeError(f"unknown step {step!r}")

    async def shielded(self, step: Shielded) -> Any:
        task = asyncio.ensure_future(adrive(step.plan, self.perform))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._undo(step, done))
            raise

    def _undo(self, step: Shielded, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        undo = step.orphan(done.result())
        if undo is not None:
            task = asyncio.ensure_future(adrive(undo, self.perform))
            _orphans.add(task)
            task.add_done_callback(_orphans.discard)
