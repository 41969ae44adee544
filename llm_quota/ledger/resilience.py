"""What the gate does while Redis is away (``FAIL_OPEN``).

``resilient`` wraps every admission, settle and release plan: the outage handling
is written once, here, and runs the same under the sync and the async driver. One
``Outage`` per process holds the three parts of fail-open:

- the ``CircuitBreaker``: after a connection error or a timeout no request touches
  Redis for ``BREAKER_COOLDOWN`` seconds, then one request per process probes it. So
  only the first requests of an outage pay the socket timeout (the django-redis
  ``SOCKET_CONNECT_TIMEOUT``/``SOCKET_TIMEOUT``), not every request after them;
- the ``FallbackLimiter``: ``FAIL_OPEN`` admits through a per-process share of the
  tier's per-minute limits, never unlimited;
- the ``OutageJournal``: the usage of calls that ran while Redis was away (admitted
  blind, or admitted by Redis and finished after it went) is charged once Redis
  answers again, before that answer's own decision. With ``JOURNAL_DIR`` it is also
  on disk, and the files of processes that died are adopted and charged by the
  living (``journal_file``). A blind reservation carries its
  day and month, computed here, so its settle is charged as a late settle into the
  right periods. A reserve whose reply was lost (``reply_lost_released``) is
  journaled as a release of its id: Redis may run it when it wakes.

An outage is logged CRITICAL once when it starts, and once when it ends with how
many requests were admitted blind.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple, TypeVar

from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_quota.conf import quota_settings, reset_on_change
from llm_quota.exceptions import QuotaUnavailable
from llm_quota.ledger import keys
from llm_quota.ledger.breaker import HALF_OPEN, CircuitBreaker
from llm_quota.ledger.connections import REDIS_ERRORS
from llm_quota.ledger.fallback import FallbackLimiter, OutageJournal
from llm_quota.ledger.journal_file import JournalFile
from llm_quota.ledger.ops import LedgerOps
from llm_quota.ledger.plans import USE_LEDGER, Plan
from llm_quota.ledger.replies import Reservation
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits
from llm_quota.rules.periods import day_and_month, month_end_ms

logger = logging.getLogger("llm_quota")

#: Errors that mean Redis did not answer. Any other ``RedisError`` is an answer (a
#: script error, say): it fails that request but says nothing about reachability.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, ClusterDownError)

#: Journal entries replayed per successful Redis call: the request that sees Redis
#: come back pays for a bounded batch, and the next ones carry on with the rest.
REPLAY_BATCH = 200

#: Seconds between two looks into ``JOURNAL_DIR`` for files of dead processes: one
#: directory listing per process per interval.
ADOPT_EVERY = 5.0

T = TypeVar("T")


class BlindRefusal(NamedTuple):
    """The fallback limiter refused a request while Redis was away."""

    limit: str
    retry_after: int


class Outage:
    def __init__(
        self,
        cooldown: float = 2.0,
        divisor: int = 4,
        journal: JournalFile | None = None,
        timezone: str = "UTC",
    ) -> None:
        self.breaker = CircuitBreaker(cooldown=cooldown)
        self.limiter = FallbackLimiter(divisor=divisor, timezone=timezone)
        self.journal = OutageJournal(store=journal)
        self.admitted_blind = 0
        self._count_lock = threading.Lock()
        self._replaying = threading.Lock()
        self._adopt_at = 0.0  # monotonic time of the next look for dead processes' files

    # -- the breaker around each Redis call -------------------------------------------

    def may_call(self) -> bool:
        """May this request call Redis now? False while the breaker is open."""
        return self.breaker.allow()

    def retry_after(self) -> int:
        """Whole seconds until the next probe, at least 1 (for ``Retry-After``)."""
        return max(1, math.ceil(self.breaker.retry_after))

    def failed(self, exc: BaseException) -> None:
        """A Redis call raised ``exc``: open the breaker if Redis did not answer."""
        if not isinstance(exc, UNREACHABLE):
            self.answered()
            return
        if self.breaker.failure():
            what = (
                "admitting requests unmetered through the per-process fallback limiter"
                if quota_settings.FAIL_OPEN
                else "FAIL_OPEN is off, answering 503"
            )
            logger.critical("Redis unavailable (%s): %s until it answers again", exc, what)

    def abandon(self) -> None:
        """The call ended without an answer or an error from Redis (cancelled): a probe
        must not leave the breaker half-open forever, so it opens for another cooldown."""
        if self.breaker.state == HALF_OPEN:
            self.breaker.failure()

    def answered(self) -> None:
        """Redis answered: close the breaker, and log the recovery if it was open."""
        if self.breaker.success():
            with self._count_lock:
                count, self.admitted_blind = self.admitted_blind, 0
            logger.critical(
                "Redis is back: %d requests were admitted blind during the outage; "
                "%d settles and releases are left to charge from the journal",
                count, len(self.journal),
            )  # fmt: skip

    # -- admitting without Redis ------------------------------------------------------

    def admit_blind(
        self, pk: Any, limits: Limits, estimate: Estimate, ledger: Any = None
    ) -> Reservation | BlindRefusal:
        """``FAIL_OPEN``: an unmetered reservation within the fallback limiter, or the
        limit it refused. ``FAIL_OPEN=False``: raise ``QuotaUnavailable`` (503)."""
        if not quota_settings.FAIL_OPEN:
            raise QuotaUnavailable(self.retry_after())
        uid = keys.user_id(pk)
        refused = self.limiter.admit(uid, limits, estimate)
        if refused is not None:
            return BlindRefusal(refused, self.retry_after())
        with self._count_lock:
            self.admitted_blind += 1
        return _unmetered(uid, limits, estimate, ledger)

    def blind_call_ended(self, reservation: Reservation) -> None:
        """Settle or release of a blind reservation: free its fallback concurrency slot."""
        if reservation.unmetered:
            self.limiter.done(reservation.user_id, reservation.api_key, reservation.team)

    # -- the journal --------------------------------------------------------------------

    def defer(self, reservation: Reservation, usage: ActualUsage | None) -> None:
        """Keep a settle (``usage``) or a release (``None``) for when Redis is back."""
        self.journal.record(reservation, usage)

    def adopt_if_due(self) -> None:
        """Every ``ADOPT_EVERY`` seconds (and on first use), take the journal files of
        dead processes (``JOURNAL_DIR``) into this one, to be replayed with its own.
        Without a directory, nothing to do."""
        store = self.journal.store
        if store is None or time.monotonic() < self._adopt_at:
            return
        self._adopt_at = time.monotonic() + ADOPT_EVERY
        try:
            self.journal.adopt()
        except OSError:
            logger.exception("journal: could not adopt the files in %s", store.directory)

    def replay(self, ops: LedgerOps) -> Plan[None]:
        """Charge a batch of the journal (a plan); one caller at a time per process.
        Raises what an unreachable Redis raised; the entry stays for the next call."""
        # Never waited for: on an event loop the holder keeps it across awaits, and a
        # blocking acquire there would stall the loop.
        if not self._replaying.acquire(blocking=False):
            return  # another caller is at it; settle is idempotent, but why twice
        try:
            yield from self.journal.replay(partial(_apply, ops), limit=REPLAY_BATCH)
        finally:
            self._replaying.release()


def resilient(
    operation: Callable[[Any], Plan[T]],
    unavailable: Callable[[BaseException | None], T],
) -> Plan[T]:
    """Run ``operation(ledger)`` on the ledger unless Redis is away; else, or when it
    fails to answer, return ``unavailable(error)`` (which may raise; ``error`` is None
    when the breaker kept the call off Redis). The one place that knows the breaker:
    every admission, settle, release and renewal goes through here.

    Errors that are not about reachability (a script error) go on to the caller; a
    call cut short without an answer (cancelled) must not leave a probe half-open.
    While the journal holds what an outage left (settles, releases of lost reserves),
    each call first charges a batch of it: a decision made after an outage sees the
    outage's usage, and no slot held by a reserve whose caller gave up on it.
    """
    state = outage()
    state.adopt_if_due()
    if not state.may_call():
        return unavailable(None)
    try:
        ledger = yield USE_LEDGER
        if len(state.journal):
            yield from state.replay(ledger.ops)
        result = yield from operation(ledger)
    except REDIS_ERRORS as exc:
        state.failed(exc)
        return unavailable(exc)
    except BaseException:
        state.abandon()
        raise
    state.answered()
    return result


def reply_lost_released(reserve: Plan[T], reservation: Reservation) -> Plan[T]:
    """Run the ``reserve`` plan for ``reservation`` (its id made by the caller); if its
    reply never comes (a timeout, a connection lost after sending, a cancellation),
    journal a release of that id. Redis may have run the reserve, or may run it once
    it wakes (a frozen server still holds it in its socket): the release gives back what
    it took, or tombstones the id so that it takes nothing. An error Redis answered with
    means the reserve did not run, and needs nothing."""
    try:
        return (yield from reserve)
    except GeneratorExit:
        raise
    except BaseException as exc:
        if isinstance(exc, UNREACHABLE) or not isinstance(exc, REDIS_ERRORS):
            outage().defer(reservation, None)
        raise


def lost_reservation(rid: str, pk: Any, limits: Limits, estimate: Estimate) -> Reservation:
    """What a release needs of a reserve that may never answer: its id, its user and
    whether it takes a global share."""
    return Reservation(
        id=rid,
        user_id=keys.user_id(pk),
        model=estimate.model,
        reserved=0,
        max_tokens=estimate.max_output_tokens,
        estimate=estimate,
        day="",
        month="",
        month_end_ms=0,
        uses_global=_uses_global(limits),
        api_key=limits.api_key,
        team=limits.team,
    )


def metered(reservation: Reservation) -> Reservation:
    """A blind reservation as the ledger must see it to charge it (a late settle)."""
    if not reservation.unmetered:
        return reservation
    return dataclasses.replace(reservation, unmetered=False)


def _apply(ops: LedgerOps, reservation: Reservation, usage: ActualUsage | None) -> Plan[None]:
    try:
        if usage is None:
            yield from ops.release(metered(reservation))
        else:
            yield from ops.settle(metered(reservation), usage)
    except UNREACHABLE:
        raise  # Redis went away again: the entry stays for the next recovery
    except REDIS_ERRORS:
        logger.exception("journal: dropping reservation %s, Redis refused it", reservation.id)


def _unmetered(uid: str, limits: Limits, estimate: Estimate, ledger: Any) -> Reservation:
    """A reservation Redis never saw, with the periods it will be charged to."""
    ops = getattr(ledger, "ops", None)  # its pinned clock, if any
    clock = getattr(ops, "clock", None) or time.time
    tz = getattr(ops, "timezone", None) or quota_settings.PERIOD_TIMEZONE
    day, month = day_and_month(clock() * 1000, tz)
    return Reservation(
        id=keys.reservation_id(),
        user_id=uid,
        model=estimate.model,
        reserved=0,
        max_tokens=estimate.max_output_tokens,
        estimate=estimate,
        day=day,
        month=month,
        month_end_ms=month_end_ms(month, tz),
        uses_global=_uses_global(limits),
        unmetered=True,
        api_key=limits.api_key,
        team=limits.team,
    )


def _uses_global(limits: Limits) -> bool:
    return limits.global_tokens_per_day is not None or limits.global_tokens_per_month is not None


_state: Outage | None = None
_state_lock = threading.Lock()


def outage() -> Outage:
    """This process's outage state, built from the settings on first use."""
    global _state
    if _state is None:
        with _state_lock:
            if _state is None:
                directory = quota_settings.JOURNAL_DIR
                _state = Outage(
                    cooldown=float(quota_settings.BREAKER_COOLDOWN),
                    divisor=int(quota_settings.FAIL_OPEN_DIVISOR),
                    timezone=str(quota_settings.PERIOD_TIMEZONE),
                    journal=None
                    if directory is None
                    else JournalFile(directory, float(quota_settings.JOURNAL_FSYNC_INTERVAL)),
                )
    return _state


@reset_on_change
def reset() -> None:
    """Forget the outage state (settings changed, or another ledger was installed)."""
    global _state
    with _state_lock:
        if _state is not None:
            # Synced and unlocked, not deleted: what it still owes is adopted by the
            # next state (or process) that looks into the directory.
            _state.journal.close()
        _state = None
