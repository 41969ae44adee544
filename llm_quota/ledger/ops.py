"""The ledger's operations as plans: which scripts to run with which keys and
arguments, and what the replies mean. No I/O happens here.

Each operation is a plan (``plans.py``) that yields a ``ScriptCall`` (or a
``LoadMonth``, when a user's counters must come back from the database) and is sent
the reply. The sync ``Ledger`` and the ``AsyncLedger`` run these very plans and differ
only in how a call is sent (redis-py or redis.asyncio).

On one Redis every operation is a single script: one round trip to reserve, one to
settle. On Redis Cluster the user's keys and the global caps live on different slots,
so a request under a global cap takes a second step in the global slot, and a refusal
there withdraws the first step (``amend.lua``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from redis.exceptions import ResponseError

from llm_quota.conf import quota_settings
from llm_quota.ledger import keys
from llm_quota.ledger.plans import LoadMonth, Plan, ScriptCall
from llm_quota.ledger.replies import (
    Decision,
    GlobalUsage,
    ModelUsage,
    PeriodReset,
    Reservation,
    Settlement,
    UserUsage,
    parse_model_fields,
    text,
)
from llm_quota.ledger.restore import EVERYONE
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits
from llm_quota.rules.periods import (
    day_and_month,
    day_end_ms,
    month_end_ms,
    period_args,
    previous_month,
)

LUA_DIR = Path(__file__).with_name("lua")

SCRIPTS = (
    "reserve",
    "settle",
    "release",
    "renew",
    "usage",
    "restore",
    "amend",
    "global_reserve",
    "global_settle",
    "global_release",
    "global_renew",
    "global_usage",
    "global_restore",
    "reset",
)


class ReservationIdSpent(ResponseError):
    """Redis answered that this reservation id is finished already: released (as a
    reserve whose reply was lost) before this reserve reached it. Nothing was reserved."""


@cache
def script_source(name: str) -> str:
    """``common.lua`` followed by the script: the helpers are shared, never copied."""
    return (LUA_DIR / "common.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()


def _limit(value: int | None) -> int:
    return -1 if value is None else int(value)


def _uses_global(limits: Limits) -> bool:
    return limits.global_tokens_per_day is not None or limits.global_tokens_per_month is not None


class LedgerOps:
    """Builds every ledger operation for one deployment (prefix, TTL, time zone).

    ``clock`` pins time (seconds since the epoch) for tests and replays; without it
    the scripts use Redis' own clock. ``cluster`` selects the two-step plans.
    """

    def __init__(
        self,
        *,
        prefix: str = "llmq",
        reservation_ttl: float = 600,
        timezone: str = "UTC",
        clock: Callable[[], float] | None = None,
        cluster: bool = False,
    ) -> None:
        self.keyspace = keys.KeySpace(prefix)
        self.ttl_ms = int(reservation_ttl * 1000)
        self.timezone = timezone
        ZoneInfo(timezone)  # fail now, not on the first request
        self.clock = clock
        self.cluster = cluster
        if cluster:
            self.keyspace.index_shard_of_slot(0)  # build the slot tags now, not mid-request

    # Time: 0 tells a script to use Redis' clock; periods still need a local guess,
    # and the script picks among previous/current/next by its own clock.
    def now_arg(self) -> tuple[int, float]:
        if self.clock is not None:
            now = int(self.clock() * 1000)
            return now, now
        return 0, time.time() * 1000

    # -- keys --------------------------------------------------------------------------

    def _user_keys(self, uid: str) -> tuple[str, ...]:
        """The user's base, plus the global base where one script may reach both."""
        base = self.keyspace.user(uid)
        return (base,) if self.cluster else (base, self.keyspace.global_())

    def index_base(self, uid: str) -> str:
        """Where ``uid`` is listed as active: one key, or the user's slot's shard."""
        return self.keyspace.index_shard(uid) if self.cluster else self.keyspace.index()

    # -- reserve -----------------------------------------------------------------------

    def reserve(
        self,
        user_id: Any,
        limits: Limits,
        estimate: Estimate,
        *,
        clamp: bool = True,
        min_output_tokens: int = 16,
        probe_prompt_tokens: int | None = None,
        probe_clamp: bool = True,
        reservation_id: str | None = None,
    ) -> Plan[Decision]:
        """Reserve ``estimate`` in every limit, or refuse. With ``probe_prompt_tokens``
        (a lower bound of the prompt), a refusal also says whether that bound would be
        refused (``Decision.probe_limit``), with ``probe_clamp`` as its clamping.

        ``reservation_id``: the caller's id for it (``keys.reservation_id()``), known
        before the call so that a reserve whose reply is lost can still be released.
        Redis reserves an id at most once: sent again, it answers from what the first
        reserve holds; released first, it raises ``ReservationIdSpent``."""
        uid = keys.user_id(user_id)
        model = keys.model_name(estimate.model)
        rid = keys.reservation_id(reservation_id)
        now_arg, local_now = self.now_arg()
        days, day_starts, months, month_starts = period_args(local_now, self.timezone)
        minimum = max(0, min_output_tokens)
        probe: int | str = ""
        if probe_prompt_tokens is not None:
            probe = probe_prompt_tokens * estimate.price.input_micro
        call = ScriptCall(
            "reserve",
            self._user_keys(uid),
            (
                now_arg, rid, self.ttl_ms,
                _limit(limits.requests_per_minute), _limit(limits.max_concurrent_requests),
                _limit(limits.tokens_per_minute), _limit(limits.tokens_per_day),
                _limit(limits.tokens_per_month), _limit(limits.global_tokens_per_day),
                _limit(limits.global_tokens_per_month),
                estimate.prompt_micro, estimate.price.output_micro, estimate.max_output_tokens,
                minimum, 1 if clamp else 0,
                model, days, day_starts, months, month_starts,
                probe, 1 if probe_clamp else 0,
            ),
        )  # fmt: skip
        reply = yield call
        for _ in range(2):  # the user's counters, then the global ones: each once
            if int(reply[0]) == 2:
                yield from self.restore(uid, text(reply[7]))
            elif int(reply[0]) == 4:
                yield from self.restore_global(text(reply[7]))
            else:
                break
            reply = yield call
        if int(reply[0]) == 3:
            raise ReservationIdSpent(f"reservation {rid} was released before it was made")
        wants_global = _uses_global(limits)
        decision = parse_decision(reply, uid, rid, estimate, uses_global=wants_global)
        if self.cluster and wants_global and decision.allowed:
            decision = yield from self._reserve_global(
                decision, reply, limits, estimate, clamp, minimum
            )
        return decision

    def _reserve_global(
        self,
        decision: Decision,
        reply: list[Any],
        limits: Limits,
        estimate: Estimate,
        clamp: bool,
        minimum: int,
    ) -> Plan[Decision]:
        """The cluster's second step: the global caps, in their own slot."""
        held = decision.reservation
        assert held is not None
        call = ScriptCall(
            "global_reserve",
            (self.keyspace.global_(),),
            (
                int(reply[5]), held.id, self.ttl_ms,
                _limit(limits.global_tokens_per_day), _limit(limits.global_tokens_per_month),
                estimate.prompt_micro, estimate.price.output_micro, held.max_tokens,
                minimum, 1 if clamp else 0,
                held.day, int(reply[15]), held.month, held.month_end_ms,
            ),
        )  # fmt: skip
        try:
            answer = yield call
        except GeneratorExit:
            raise
        except BaseException:
            # No answer (Redis failed or the task was cancelled): withdraw the user's
            # share instead of holding it for a lease. A global share that was taken
            # all the same ends with its own lease.
            yield self._amend(held, 0)
            raise
        if int(answer[0]) == 3:  # released here before this step came: take none of it
            yield self._amend(held, 0)
            raise ReservationIdSpent(f"reservation {held.id} was released before it was made")
        if int(answer[0]) == 1:
            granted, reserved = int(answer[3]), int(answer[4])
            if reserved < held.reserved:
                # The global caps clamped harder: lower the user's share to match.
                # Should this fail, the user holds a little more until settle corrects it.
                try:
                    yield self._amend(held, reserved)
                except Exception:
                    pass
            return dataclasses.replace(
                decision,
                reservation=dataclasses.replace(held, reserved=reserved, max_tokens=granted),
                tokens_remaining=_plus(decision.tokens_remaining, held.reserved - reserved),
            )
        try:
            yield self._amend(held, 0)
        except Exception:
            pass  # not withdrawn: the user's share ends with its lease
        return dataclasses.replace(
            decision,
            allowed=False,
            limit=text(answer[1]),
            retry_after=int(answer[2]) / 1000,
            reservation=None,
            requests_remaining=_plus(decision.requests_remaining, 1),
            tokens_remaining=_plus(decision.tokens_remaining, held.reserved),
        )

    def _amend(self, held: Reservation, amount: int) -> ScriptCall:
        now_arg, _ = self.now_arg()
        return ScriptCall(
            "amend", (self.keyspace.user(held.user_id),), (now_arg, held.id, self.ttl_ms, amount)
        )

    # -- settle and release ------------------------------------------------------------

    def settle(self, reservation: Reservation, usage: ActualUsage) -> Plan[Settlement]:
        """Replace the estimate by the real usage; a second call changes nothing."""
        if reservation.unmetered:
            return Settlement(False, False, 0)
        if reservation.estimate is None:  # pragma: no cover - reservations come from reserve()
            raise ValueError("a reservation without its estimate cannot be priced")
        actual = reservation.estimate.price.base_tokens(
            usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
        )
        uid = keys.user_id(reservation.user_id)
        rid = keys.reservation_id(reservation.id)
        now_arg, _ = self.now_arg()
        user_keys = self._user_keys(uid)
        pattern = reservation.estimate.price.pattern
        reply = yield ScriptCall(
            "settle",
            (user_keys[0], self.index_base(uid), *user_keys[1:]),
            (
                now_arg, rid, self.ttl_ms, uid,
                actual, usage.input_tokens, usage.output_tokens,
                reservation.day, reservation.month, reservation.month_end_ms,
                1 if reservation.uses_global else 0, keys.model_name(reservation.model),
                "" if pattern is None else keys.model_field(pattern),
                int(quota_settings.MODEL_NAMES_PER_MONTH),
            ),
        )  # fmt: skip
        outcome, delta, month_used, prior = (
            int(reply[0]), int(reply[1]), int(reply[2]), text(reply[3]),
        )  # fmt: skip
        if self.cluster and reservation.uses_global:
            yield self._settle_global(reservation, rid, actual, prior)
        if outcome not in (1, 2):
            return Settlement(False, False, 0)
        return Settlement(
            settled=True,
            late=outcome == 2,
            charged_delta=delta,
            month=reservation.month,
            month_used=month_used,
            base_tokens=actual,
        )

    def _settle_global(
        self, reservation: Reservation, rid: str, actual: int, prior: str
    ) -> ScriptCall:
        """The global share follows what the user's step found: a share left pending by
        a settle or release that died between its steps is completed, never doubled."""
        now_arg, _ = self.now_arg()
        global_keys = (self.keyspace.global_(),)
        if prior == "l":
            return ScriptCall("global_release", global_keys, (now_arg, rid, self.ttl_ms))
        return ScriptCall(
            "global_settle",
            global_keys,
            (
                now_arg, rid, self.ttl_ms, actual,
                reservation.day, reservation.month, reservation.month_end_ms,
                0 if prior == "s" else 1,
            ),
        )  # fmt: skip

    def release(self, reservation: Reservation) -> Plan[bool]:
        """Give the whole estimate back (a failed call); a second call changes nothing.

        Also releases a reserve whose reply was lost: an id Redis has not seen is
        tombstoned, so that reserve takes nothing should it arrive later. On a cluster
        the global share is released (or tombstoned) whatever the user's step found:
        a global step whose reply was lost may hold a share after the user's was
        withdrawn."""
        return (yield from self._lease_step(reservation, "release", global_always=True))

    def renew(self, reservation: Reservation) -> Plan[bool]:
        """Move a pending reservation's lease (and its global share's) out to a TTL from
        now: the call is still running. False, and nothing changed, once it is settled,
        released or expired."""
        return (yield from self._lease_step(reservation, "renew", global_always=False))

    def _lease_step(
        self, reservation: Reservation, script: str, *, global_always: bool
    ) -> Plan[bool]:
        """``script`` on the reservation's lease, then (on a cluster) ``global_<script>``
        on its global share: always, or only when the user's step found it pending."""
        if reservation.unmetered:
            return False
        uid = keys.user_id(reservation.user_id)
        rid = keys.reservation_id(reservation.id)
        now_arg, _ = self.now_arg()
        args = (now_arg, rid, self.ttl_ms)
        done = int((yield ScriptCall(script, self._user_keys(uid), args))) == 1
        if (done or global_always) and self.cluster and reservation.uses_global:
            yield ScriptCall(f"global_{script}", (self.keyspace.global_(),), args)
        return done

    # -- reading -----------------------------------------------------------------------

    def usage_call(self, uid: str) -> ScriptCall:
        now_arg, local_now = self.now_arg()
        return ScriptCall(
            "usage",
            (self.keyspace.user(uid),),
            (now_arg, self.ttl_ms, *period_args(local_now, self.timezone)),
        )

    def usage(self, user_id: Any, *, restore_lost: bool = False) -> Plan[UserUsage]:
        """The user's live counters; with ``restore_lost``, counters Redis lost are
        restored from the database first, as the next reserve would."""
        uid = keys.user_id(user_id)
        r = yield self.usage_call(uid)
        if restore_lost and not usage_is_trusted(r):
            yield from self.restore(uid, text(r[2]))
            r = yield self.usage_call(uid)
        return parse_usage(r)

    def global_usage(self) -> Plan[GlobalUsage]:
        now_arg, local_now = self.now_arg()
        r = yield ScriptCall(
            "global_usage",
            (self.keyspace.global_(),),
            (now_arg, self.ttl_ms, *period_args(local_now, self.timezone)),
        )
        return GlobalUsage(**_periods(r), in_flight=int(r[7]))

    # -- restore -----------------------------------------------------------------------

    def restore(self, user_id: Any, month: str) -> Plan[bool]:
        """Add the database's record of ``month`` (and the month before) back, once per
        loss: a late settle into the closed month must not leave it partial."""
        uid = keys.user_id(user_id)
        now_arg, local_now = self.now_arg()
        today, _ = day_and_month(local_now, self.timezone)
        args: list[Any] = [uid, now_arg, today, day_end_ms(today, self.timezone), 0]
        for period in (month, previous_month(month)):
            loaded = yield LoadMonth(uid, period)
            total, rows = loaded[0], loaded[1]
            if len(loaded) > 3 and loaded[2] == today:  # the day comes back with its month
                args[4] = int(loaded[3])
            pairs: list[Any] = []
            for row in rows:
                model = keys.model_field(row.model)  # a pattern too (MODEL_NAMES_PER_MONTH)
                pairs += [
                    f"req|{model}", row.requests, f"in|{model}", row.input_tokens,
                    f"out|{model}", row.output_tokens, f"base|{model}", row.base_tokens,
                ]  # fmt: skip
            args += [period, month_end_ms(period, self.timezone), int(total), len(pairs), *pairs]
        result = yield ScriptCall(
            "restore", (self.keyspace.user(uid), self.index_base(uid)), tuple(args)
        )
        return int(result) == 1

    def restore_global(self, month: str) -> Plan[bool]:
        """Add the database's record of everyone's ``month`` and today back into the
        global caps' counters, once per loss (all users' snapshots summed)."""
        now_arg, local_now = self.now_arg()
        today, _ = day_and_month(local_now, self.timezone)
        loaded = yield LoadMonth(EVERYONE, month)
        day_total = int(loaded[3]) if len(loaded) > 3 and loaded[2] == today else 0
        result = yield ScriptCall(
            "global_restore",
            (self.keyspace.global_(),),
            (
                now_arg, today, day_end_ms(today, self.timezone), day_total,
                month, month_end_ms(month, self.timezone), int(loaded[0]),
            ),
        )  # fmt: skip
        return int(result) == 1

    # -- admin -------------------------------------------------------------------------

    def reset_period(self, user_id: Any) -> Plan[PeriodReset]:
        """Forgive the user's usage of the current day and month, atomically.

        Requests in flight keep their reservations (they settle against the reset
        counters); settled usage and the month's per-model figures go. Global counters
        keep the usage: the money was spent.
        """
        uid = keys.user_id(user_id)
        now_arg, local_now = self.now_arg()
        r = yield ScriptCall(
            "reset",
            (self.keyspace.user(uid), self.index_base(uid)),
            (now_arg, self.ttl_ms, uid, *period_args(local_now, self.timezone)),
        )
        return PeriodReset(text(r[0]), text(r[1]), int(r[2]), int(r[3]))


def _plus(value: int | None, amount: int) -> int | None:
    return None if value is None else value + amount


def _periods(r: list[Any]) -> dict[str, Any]:
    """The period fields that open ``usage.lua``'s and ``global_usage.lua``'s replies."""
    return {
        "day": text(r[1]), "month": text(r[2]),
        "day_end_ms": int(r[3]), "month_end_ms": int(r[4]),
        "tokens_today": int(r[5]), "tokens_this_month": int(r[6]),
    }  # fmt: skip


def usage_is_trusted(r: list[Any]) -> bool:
    """``usage.lua``'s reply says the counters were not lost (or were restored)."""
    return bool(int(r[12]))


def parse_usage(r: list[Any]) -> UserUsage:
    """``usage.lua``'s reply as a ``UserUsage``."""
    return UserUsage(
        **_periods(r),
        reserved=int(r[7]),
        requests_this_minute=int(r[8]),
        tokens_this_minute=int(r[9]),
        in_flight=int(r[10]),
        by_model=parse_model_fields(r[11]),
    )


def parse_decision(
    r: list[Any], uid: str, rid: str, estimate: Estimate, *, uses_global: bool
) -> Decision:
    """``reserve.lua``'s reply as a ``Decision`` (and its ``Reservation`` if admitted)."""
    status, limit = int(r[0]), text(r[1]) or None
    reservation = None
    if status == 1:
        reservation = Reservation(
            id=rid,
            user_id=uid,
            model=estimate.model,
            reserved=int(r[4]),
            max_tokens=int(r[3]),
            estimate=estimate,
            day=text(r[6]),
            month=text(r[7]),
            month_end_ms=int(r[14]),
            uses_global=uses_global,
        )
    return Decision(
        allowed=status == 1,
        limit=limit,
        retry_after=int(r[2]) / 1000,
        reservation=reservation,
        requested_max_tokens=estimate.max_output_tokens,
        requests_limit=None if int(r[8]) < 0 else int(r[8]),
        requests_remaining=None if int(r[8]) < 0 else max(int(r[9]), 0),
        requests_reset=int(r[10]) / 1000,
        tokens_limit=None if int(r[11]) < 0 else int(r[11]),
        tokens_remaining=None if int(r[11]) < 0 else max(int(r[12]), 0),
        tokens_reset=int(r[13]) / 1000,
        probe_limit=(text(r[16]) or None) if len(r) > 16 else None,
        probe_retry_after=int(r[17]) / 1000 if len(r) > 17 else 0.0,
        tokens_window=int(r[18]) / 1000 if len(r) > 18 else 60.0,
    )


__all__ = [
    "LedgerOps",
    "LoadMonth",
    "ModelUsage",
    "Plan",
    "ReservationIdSpent",
    "SCRIPTS",
    "ScriptCall",
]
