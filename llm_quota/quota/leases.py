"""The lease keeper: a call that outlives ``RESERVATION_TTL`` keeps its reservation.

A reservation is a lease: unsettled, it expires after the TTL and gives its tokens and
its concurrency slot back, so a crashed worker cannot hold them for ever. A stream or a
slow completion may run longer than that, and must keep them while it is alive: else
a concurrency-1 user could start a second call beside it, and the budget would count
a running call as free.

One daemon thread per process renews every live reservation, for sync and async
callers alike: a guard ``hold``s its reservation once admitted and ``drop``s it when
it settles, releases or charges (every way a guard finishes). The thread renews a
reservation once it is a third of a TTL old, then every third of a TTL, so a call
shorter than that (most of them) costs no round trip, and two renewals may fail before
a lease ends. A process that dies stops renewing, so its leases still expire; so does
a guard dropped without being finished (it is held weakly). While Redis is away a
renewal is skipped and tried again sooner.

A guard that stays referenced but is never finished (a stream nobody reads or closes)
would hold its slot for ever: where ``LEASE_MAX_SECONDS`` is set (by default it is not: the
contract keeps a living call's reservation), past it the keeper stops renewing it,
says so once, and the lease expires a TTL later. Nothing is lost: an expired lease's
settle charges the call's usage in full.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from llm_quota.conf import quota_settings
from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.default import current_ledger
from llm_quota.ledger.replies import Reservation
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota.admission import renew_plan
from llm_quota.quota.drivers import arun, run

logger = logging.getLogger("llm_quota")

#: Renewals per TTL: a lease is renewed when a third of it is gone, so it survives two
#: renewals that fail or come late.
RENEWALS_PER_TTL = 3
#: After a renewal Redis could not take, the next try comes this much sooner.
RETRY_FRACTION = 0.5
#: Longest a renewal on an event loop's ledger is waited for: well under a third of the
#: shortest TTL (60 s), so one stalled loop cannot make the other leases late.
LOOP_TIMEOUT = 5.0
INF = float("inf")


@dataclass
class _Lease:
    reservation: Reservation
    #: The ledger to renew on: the sync one the call reserved on, or an async one with
    #: no sync twin, renewed on its own event loop.
    ledger: Ledger | None
    aledger: AsyncLedger | None
    loop: asyncio.AbstractEventLoop | None
    every: float
    due: float
    #: When the keeper stops renewing (monotonic), or INF.
    until: float

    def renew(self) -> bool | None:
        """True renewed, False no longer pending, None Redis could not be asked."""
        plan = renew_plan(self.reservation)
        if self.loop is None:
            return run(plan, self.ledger)
        if self.loop.is_closed():
            return False  # nothing is left to settle it; let the lease expire
        future = asyncio.run_coroutine_threadsafe(arun(plan, self.aledger), self.loop)
        return future.result(LOOP_TIMEOUT)


class LeaseKeeper:
    """Renews the leases of this process's live calls from one daemon thread."""

    def __init__(self) -> None:
        self._leases: weakref.WeakKeyDictionary[Any, _Lease] = weakref.WeakKeyDictionary()
        self._wake = threading.Condition()
        self._wake_at = INF
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._leases)

    def hold(
        self,
        owner: Any,
        reservation: Reservation,
        ledger: Ledger | None = None,
        aledger: AsyncLedger | None = None,
    ) -> None:
        """Keep ``reservation`` alive while ``owner`` (weakly held) has not dropped it.

        ``ledger``/``aledger``: the ledger the call reserved on (None: the project's).
        Costs no round trip: the first renewal comes a third of a TTL later."""
        if reservation.unmetered:
            return  # admitted blind: Redis holds no lease for it
        loop = None
        if ledger is None and aledger is not None:
            ledger = aledger.mirrors
            if ledger is None:  # an async ledger of its own: renewed on its loop
                loop = asyncio.get_running_loop()
        if ledger is None and loop is None:
            ledger = current_ledger()  # the project's, which the call reserved on
        held_on = ledger or aledger
        ttl = quota_settings.RESERVATION_TTL if held_on is None else held_on.ttl_ms / 1000
        every = ttl / RENEWALS_PER_TTL
        now = time.monotonic()
        due = now + every
        longest = quota_settings.LEASE_MAX_SECONDS
        until = INF if longest is None else now + float(longest)
        lease = _Lease(reservation, ledger, aledger if loop else None, loop, every, due, until)
        with self._wake:
            self._leases[owner] = lease
            if due < self._wake_at:
                self._wake.notify()  # only when the keeper sleeps past it: rarely
            self._start()

    def drop(self, owner: Any) -> None:
        """``owner``'s call has ended: stop renewing its lease."""
        with self._wake:
            self._leases.pop(owner, None)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="llm-quota-lease-keeper", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._tick()

    def _tick(self) -> None:
        """Renew what is due. A function of its own: once it returns, the keeper holds
        no reference to a guard, which may then be collected while the keeper sleeps."""
        for owner, lease in self._due():
            self._renew(owner, lease)

    def _due(self) -> list[tuple[Any, _Lease]]:
        """Wait until some lease is due, and return every due one."""
        with self._wake:
            while True:
                now = time.monotonic()
                due = [(owner, lease) for owner, lease in self._leases.items() if lease.due <= now]
                if due:
                    self._wake_at = now
                    return due
                # Only the leases while it sleeps, never their owners: a guard dropped
                # unfinished must be collectable meanwhile.
                self._wake_at = min((lease.due for lease in self._leases.values()), default=INF)
                self._wake.wait(None if self._wake_at == INF else self._wake_at - now)

    def _renew(self, owner: Any, lease: _Lease) -> None:
        if lease.due >= lease.until:
            logger.warning(
                "reservation %s unfinished after LEASE_MAX_SECONDS (%s s): no longer "
                "renewed, its lease expires within RESERVATION_TTL",
                lease.reservation.id, quota_settings.LEASE_MAX_SECONDS,
            )  # fmt: skip
            self.drop(owner)
            return
        try:
            renewed = lease.renew()
        except Exception:  # a renewal may never take the keeper down
            logger.exception("could not renew reservation %s", lease.reservation.id)
            renewed = None
        with self._wake:
            if self._leases.get(owner) is not lease:
                return  # dropped (or held anew) meanwhile
            if renewed is False:
                del self._leases[owner]  # settled, released or expired: nothing to keep
            elif renewed:
                lease.due = time.monotonic() + lease.every
            else:
                lease.due = time.monotonic() + lease.every * RETRY_FRACTION


_keeper = LeaseKeeper()


def keeper() -> LeaseKeeper:
    """This process's lease keeper."""
    return _keeper


def _after_fork() -> None:
    """A forked child starts with no thread and no calls of its own."""
    global _keeper
    _keeper = LeaseKeeper()


os.register_at_fork(after_in_child=_after_fork)
