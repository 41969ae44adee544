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
from llm_quota.ledger.plans import LoadMonth, LoadTeamMonth, Plan, ScriptCall
from llm_quota.ledger.replies import (
    BurnState,
    Decision,
    GlobalUsage,
    KeyUsage,
    MemberUsage,
    ModelUsage,
    PeriodReset,
    Reservation,
    Settlement,
    TeamUsage,
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
    month_start,
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
    "payer_usage",
    "payer_settle",
    "team_reserve",
    "key_restore",
    "global_restore",
    "team_restore",
    "raise",
    "payer_raise",
    "global_raise",
    "reset",
    "share_reset",
    "burn_resume",
    "burn_state",
)


class ReservationIdSpent(ResponseError):
    """Redis answered that this reservation id is finished already: released (as a
    reserve whose reply was lost) before this reserve reached it. Nothing was reserved."""


@cache
def script_source(name: str) -> str:
    """``common.lua``, then ``burn.lua`` (the burn-rate breaker's functions, for any
    payer), then the script: the helpers are shared, never copied."""
    parts = ("common", "burn", name)
    return "\n".join((LUA_DIR / f"{part}.lua").read_text() for part in parts)


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

    def _payers(self, uid: str, api_key: str | None, team: str | None) -> list[str]:
        """The bases of the payers besides the user that the user's own script reaches:
        the API key's (always in the user's slot) and, on one Redis, the team's."""
        bases = []
        if api_key is not None:
            bases.append(self.keyspace.api_key(uid, api_key))
        if team is not None and not self.cluster:
            bases.append(self.keyspace.team(team))
        return bases

    def _first_step_keys(self, uid: str, payers: list[str], *, index: bool = False) -> tuple:
        """KEYS of a user script: B (and I), the payers' bases, then G on one Redis."""
        head = [self.keyspace.user(uid)] + ([self.index_base(uid)] if index else [])
        tail = [] if self.cluster else [self.keyspace.global_()]
        return (*head, *payers, *tail)

    def _payer_limits(self, limits: Limits) -> list[Any]:
        """reserve.lua's payer arguments: how many, then label, four limits and the
        burn-rate breaker each (a key's is its user's tier's, a team's its tier's)."""
        rows: list[Any] = []
        if limits.api_key is not None:
            rows.append((
                "key.", _limit(limits.key_requests_per_minute), -1,
                _limit(limits.key_tokens_per_day), _limit(limits.key_tokens_per_month),
                *_burn_args(limits),
            ))  # fmt: skip
        if limits.team is not None and not self.cluster:
            rows.append((*_team_args(limits), *_team_burn_args(limits)))
        return [len(rows), *(value for row in rows for value in row)]

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
        payers = self._payers(uid, limits.api_key, limits.team)
        call = ScriptCall(
            "reserve",
            self._first_step_keys(uid, payers),
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
                # The burn-rate breaker (burn.lua): multiplier, floor, pause; -1 = off.
                *_burn_args(limits),
                # Adaptive slow-down past the soft limit (burn.lua); -1 = off.
                _limit(limits.slow_soft_percent),
                # The other payers (a key, a team): their count, then eight values each.
                *self._payer_limits(limits),
            ),
        )  # fmt: skip
        reply = yield call
        # The user's counters, the team's, the global caps': each restored once per loss.
        for _ in range(3):
            status = int(reply[0])
            if status == 2 and text(reply[1]) == "team." and limits.team is not None:
                yield from self.restore_team(limits.team, text(reply[7]))
            elif status == 2:
                yield from self.restore(uid, text(reply[7]))
            elif status == 4:
                yield from self.restore_global(text(reply[7]))
            else:
                break
            reply = yield call
        if int(reply[0]) == 3:
            raise ReservationIdSpent(f"reservation {rid} was released before it was made")
        wants_global = _uses_global(limits)
        decision = parse_decision(
            reply, uid, rid, estimate, uses_global=wants_global, api_key=limits.api_key,
            team=limits.team,
        )  # fmt: skip
        if self.cluster and decision.allowed:
            # The payers in slots of their own, each a step that withdraws every step
            # before it when it refuses: the team, then the global caps.
            taken: list[ScriptCall] = []
            if limits.team is not None:
                decision = yield from self._reserve_apart(
                    decision, self._team_call(decision, reply, limits, estimate, clamp, minimum),
                    taken, self.keyspace.team(limits.team),
                    restore=self.restore_team(limits.team, text(reply[7])),
                )  # fmt: skip
            if wants_global and decision.allowed:
                decision = yield from self._reserve_apart(
                    decision,
                    self._global_call(decision, reply, limits, estimate, clamp, minimum),
                    taken, self.keyspace.global_(),
                    restore=self.restore_global(text(reply[7])),
                )  # fmt: skip
        return decision

    def _global_call(
        self,
        decision: Decision,
        reply: list[Any],
        limits: Limits,
        estimate: Estimate,
        clamp: bool,
        minimum: int,
    ) -> ScriptCall:
        """The cluster's step for the global caps, in their own slot."""
        held = decision.reservation
        assert held is not None
        return ScriptCall(
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

    def _team_call(
        self,
        decision: Decision,
        reply: list[Any],
        limits: Limits,
        estimate: Estimate,
        clamp: bool,
        minimum: int,
    ) -> ScriptCall:
        """The cluster's step for the team, in the team's own slot."""
        held = decision.reservation
        assert held is not None and limits.team is not None
        return ScriptCall(
            "team_reserve",
            (self.keyspace.team(limits.team),),
            (
                int(reply[5]), held.id, self.ttl_ms, *_team_args(limits),
                estimate.prompt_micro, estimate.price.output_micro, held.max_tokens,
                minimum, 1 if clamp else 0,
                held.day, int(reply[15]), held.month, held.month_end_ms,
                *_team_burn_args(limits),
            ),
        )  # fmt: skip

    def _reserve_apart(
        self,
        decision: Decision,
        call: ScriptCall,
        taken: list[ScriptCall],
        base: str,
        restore: Plan[bool] | None = None,
    ) -> Plan[Decision]:
        """One step in a payer's own slot, after the user's. Refused, or unanswered, it
        withdraws the user's share and releases the shares ``taken`` in earlier steps;
        admitted, it joins ``taken``. A harder clamp lowers the user's share to match
        (an earlier step's share keeps the higher figure until settle: never less).
        A payer whose counters were lost (a team's, the global caps') runs ``restore``,
        then the step again."""
        held = decision.reservation
        assert held is not None
        release = ScriptCall("global_release", (base,), (call.args[0], held.id, self.ttl_ms))

        def undo() -> Plan[None]:
            for step in (self._amend(held, 0), *taken):
                try:
                    yield step
                except Exception:
                    pass  # not undone: that share ends with its lease

        try:
            answer = yield call
            if int(answer[0]) in (2, 4) and restore is not None:
                yield from restore
                answer = yield call
        except GeneratorExit:
            raise
        except BaseException:
            # No answer (Redis failed or the task was cancelled): withdraw the earlier
            # steps instead of holding them for a lease. A share taken here all the same
            # ends with its own lease.
            yield from undo()
            raise
        if int(answer[0]) == 3:  # released here before this step came: take none of it
            yield from undo()
            raise ReservationIdSpent(f"reservation {held.id} was released before it was made")
        if int(answer[0]) == 1:
            taken.append(release)
            granted, reserved = int(answer[3]), int(answer[4])
            if reserved < held.reserved:
                try:
                    yield self._amend(held, reserved)
                except Exception:
                    pass  # the user holds a little more until settle corrects it
            decision = dataclasses.replace(
                decision,
                reservation=dataclasses.replace(held, reserved=reserved, max_tokens=granted),
                tokens_remaining=_plus(decision.tokens_remaining, held.reserved - reserved),
            )
            return self._tighter(decision, answer)
        yield from undo()
        decision = self._tighter(decision, answer)
        return dataclasses.replace(
            decision,
            allowed=False,
            limit=text(answer[1]),
            retry_after=int(answer[2]) / 1000,
            reservation=None,
            burn_tripped=len(answer) > 12 and int(answer[12]) == 1,
            requests_remaining=_plus(decision.requests_remaining, 1),
            tokens_remaining=_plus(decision.tokens_remaining, held.reserved),
        )

    def _tighter(self, decision: Decision, answer: list[Any]) -> Decision:
        """The rate-limit figures of ``decision``, or of a step apart (a team's) where
        its limits have less left: the headers show the tightest level."""
        if len(answer) < 12:
            return decision  # global_reserve.lua reports no figures
        changes: dict[str, Any] = {}
        t_limit, t_left = int(answer[5]), int(answer[6])
        if t_limit >= 0 and (
            decision.tokens_limit is None or t_left < (decision.tokens_remaining or 0)
        ):
            month = decision.reservation.month if decision.reservation else None
            window = 86400.0
            if text(answer[8]) == "m" and month:
                start = month_start(month, self.timezone).timestamp()
                window = month_end_ms(month, self.timezone) / 1000 - start
            changes.update(
                tokens_limit=t_limit, tokens_remaining=t_left,
                tokens_reset=int(answer[7]) / 1000, tokens_window=window,
            )  # fmt: skip
        r_limit, r_left = int(answer[9]), int(answer[10])
        if r_limit >= 0 and (
            decision.requests_limit is None or r_left < (decision.requests_remaining or 0)
        ):
            changes.update(
                requests_limit=r_limit, requests_remaining=r_left,
                requests_reset=int(answer[11]) / 1000,
            )  # fmt: skip
        return dataclasses.replace(decision, **changes) if changes else decision

    def _amend(self, held: Reservation, amount: int) -> ScriptCall:
        now_arg, _ = self.now_arg()
        payers: tuple[str, ...] = (self.keyspace.user(held.user_id),)
        if held.api_key is not None:  # the key's share was taken by the same script
            payers += (self.keyspace.api_key(held.user_id, held.api_key),)
        return ScriptCall("amend", payers, (now_arg, held.id, self.ttl_ms, amount))

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
        payers = self._payers(uid, reservation.api_key, reservation.team)
        model = keys.model_name(reservation.model)
        payer_args: list[Any] = [len(payers)]
        if reservation.api_key is not None:
            payer_args += ["", f"{uid}:{keys.api_key_id(reservation.api_key)}"]
        if reservation.team is not None and not self.cluster:
            payer_args += [_team_suffixes(uid, model), ""]
        pattern = reservation.estimate.price.pattern
        reply = yield ScriptCall(
            "settle",
            self._first_step_keys(uid, payers, index=True),
            (
                now_arg, rid, self.ttl_ms, uid,
                actual, usage.input_tokens, usage.output_tokens,
                reservation.day, reservation.month, reservation.month_end_ms,
                1 if reservation.uses_global else 0, model,
                "" if pattern is None else keys.model_field(pattern),
                int(quota_settings.MODEL_NAMES_PER_MONTH), *payer_args,
            ),
        )  # fmt: skip
        outcome, delta, month_used, prior = (
            int(reply[0]), int(reply[1]), int(reply[2]), text(reply[3]),
        )  # fmt: skip
        team_used = None
        if reservation.team is not None and not self.cluster and len(reply) > 4:
            team_used = int(reply[4][-1])  # the team is the last payer of the script
        if self.cluster and reservation.team is not None:
            answer = yield self._settle_team(reservation, rid, actual, prior, usage, uid, model)
            if isinstance(answer, list | tuple):
                team_used = int(answer[1])
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
            team_month_used=None if team_used is None or team_used < 0 else team_used,
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

    def _settle_team(
        self,
        reservation: Reservation,
        rid: str,
        actual: int,
        prior: str,
        usage: ActualUsage,
        uid: str,
        model: str,
    ) -> ScriptCall:
        """The team's share follows what the user's step found, as the global one does."""
        now_arg, _ = self.now_arg()
        team_keys = (self.keyspace.team(reservation.team),)
        if prior == "l":
            return ScriptCall("global_release", team_keys, (now_arg, rid, self.ttl_ms))
        return ScriptCall(
            "payer_settle",
            team_keys,
            (
                now_arg, rid, self.ttl_ms, actual,
                reservation.day, reservation.month, reservation.month_end_ms,
                0 if prior == "s" else 1, _team_suffixes(uid, model),
                usage.input_tokens, usage.output_tokens,
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
        payers = self._payers(uid, reservation.api_key, reservation.team)
        step = ScriptCall(script, self._first_step_keys(uid, payers), (*args, len(payers)))
        done = int((yield step)) == 1
        if (done or global_always) and self.cluster:
            # The shares in slots of their own: global_release/renew.lua work on any.
            apart = [self.keyspace.team(reservation.team)] if reservation.team else []
            if reservation.uses_global:
                apart.append(self.keyspace.global_())
            for base in apart:
                yield ScriptCall(f"global_{script}", (base,), args)
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

    def key_usage(self, user_id: Any, api_key: Any) -> Plan[KeyUsage]:
        """An API key's live counters, as the next decision with it would see them."""
        now_arg, local_now = self.now_arg()
        r = yield self._payer_usage_call(self.keyspace.api_key(user_id, api_key))
        month = {text(k): int(v) for k, v in zip(r[9][::2], r[9][1::2], strict=True)}
        return KeyUsage(
            **_periods(r),
            reserved=int(r[7]),
            requests_this_minute=int(r[8]),
            requests=month.get("req", 0),
            input_tokens=month.get("in", 0),
            output_tokens=month.get("out", 0),
            base_tokens=month.get("base", 0),
        )

    def _payer_usage_call(self, base: str) -> ScriptCall:
        now_arg, local_now = self.now_arg()
        return ScriptCall(
            "payer_usage", (base,), (now_arg, self.ttl_ms, *period_args(local_now, self.timezone))
        )

    def team_usage(self, team: Any, *, restore_lost: bool = False) -> Plan[TeamUsage]:
        """A team's live counters, and its settled month by member and by model; with
        ``restore_lost``, counters Redis lost are restored first, as the next reserve
        charged to the team would."""
        r = yield self._payer_usage_call(self.keyspace.team(team))
        if restore_lost and not int(r[11]):
            yield from self.restore_team(team, text(r[2]))
            r = yield self._payer_usage_call(self.keyspace.team(team))
        members: dict[str, list[int]] = {}
        models: dict[str, list[int]] = {}
        slot = {"req": 0, "in": 1, "out": 2, "base": 3}
        for name, value in zip(r[9][::2], r[9][1::2], strict=True):
            kind, _, who = text(name).partition("|")
            if kind in slot and who[:2] in ("u:", "m:"):
                into = members if who[0] == "u" else models
                into.setdefault(who[2:], [0, 0, 0, 0])[slot[kind]] = int(value)
        return TeamUsage(
            **_periods(r),
            reserved=int(r[7]),
            requests_this_minute=int(r[8]),
            in_flight=int(r[10]),
            by_member=[MemberUsage(uid, *c) for uid, c in sorted(members.items())],
            by_model=[ModelUsage(name, *c) for name, c in sorted(models.items())],
        )

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
        if int(result) != 1:
            return False  # another request restored first, its keys with it
        yield from self._restore_keys(uid, month)
        return True

    def _restore_keys(self, uid: str, month: str) -> Plan[None]:
        """The user's API keys' days and months, after the user's own restore (which ran
        once per loss, so these are added once): one script per key that has any."""
        now_arg, local_now = self.now_arg()
        today, _ = day_and_month(local_now, self.timezone)
        per_key: dict[int, list[Any]] = {}
        day_totals: dict[int, int] = {}
        for period in (month, previous_month(month)):
            for key_id, row in (yield LoadMonth(uid, period, api_keys=True)):
                per_key.setdefault(key_id, []).extend((
                    period, month_end_ms(period, self.timezone), row.base_tokens,
                    row.requests, row.input_tokens, row.output_tokens,
                ))  # fmt: skip
                if row.day == today:  # the day comes back with its month
                    day_totals[key_id] = int(row.day_base_tokens)
        day_args = (today, day_end_ms(today, self.timezone))
        for key_id, groups in per_key.items():
            yield ScriptCall(
                "key_restore",
                (self.keyspace.api_key(uid, key_id),),
                (now_arg, *day_args, day_totals.get(key_id, 0), *groups),
            )

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

    def restore_team(self, team: Any, month: str) -> Plan[bool]:
        """Add the database's record of a team's ``month`` (and the month before) back,
        once per loss (``team_restore.lua``): its total, by member and by model, in the
        fields settle keeps (``_team_suffixes``), and its day if that is still today."""
        now_arg, local_now = self.now_arg()
        today, _ = day_and_month(local_now, self.timezone)
        args: list[Any] = [now_arg, today, day_end_ms(today, self.timezone), 0]
        for period in (month, previous_month(month)):
            snapshot = yield LoadTeamMonth(keys.api_key_id(team), period)
            pairs: list[Any] = []
            total = 0
            if snapshot is not None:
                if snapshot.day == today:  # the day comes back with its month
                    args[3] = int(snapshot.day_base_tokens)
                total = snapshot.total.base_tokens
                parts = [("", snapshot.total)]
                parts += [(f"|u:{keys.user_id(m.user_id)}", m) for m in snapshot.by_member]
                parts += [(f"|m:{keys.model_name(m.model)}", m) for m in snapshot.by_model]
                for suffix, c in parts:
                    pairs += [
                        f"req{suffix}", c.requests, f"in{suffix}", c.input_tokens,
                        f"out{suffix}", c.output_tokens, f"base{suffix}", c.base_tokens,
                    ]  # fmt: skip
            args += [period, month_end_ms(period, self.timezone), int(total), len(pairs), *pairs]
        result = yield ScriptCall("team_restore", (self.keyspace.team(team),), tuple(args))
        return int(result) == 1

    def raise_to_snapshot(
        self, user_id: Any, generation: int, month: str, fields: dict[str, int]
    ) -> Plan[int]:
        """Raise the user's settled ``month`` to the snapshot's ``fields``
        (``"base|<model>"`` -> count, ...) where Redis is behind them in the same
        ``generation`` (a promoted replica's missed writes; ``raise.lua``). Returns the
        base tokens added, also to the month's and today's counters; a reset since the
        snapshot (another generation) or counters lost whole (restore's) add nothing."""
        uid = keys.user_id(user_id)
        now_arg, local_now = self.now_arg()
        today, current = day_and_month(local_now, self.timezone)
        day = today if month == current else ""
        pairs = [value for field, n in fields.items() for value in (field, int(n))]
        reply = yield ScriptCall(
            "raise",
            (self.keyspace.user(uid), self.index_base(uid)),
            (
                uid, now_arg, int(generation), month, month_end_ms(month, self.timezone),
                day, day_end_ms(today, self.timezone), *pairs,
            ),
        )  # fmt: skip
        return int(reply)

    def raise_key(
        self, user_id: Any, key_id: Any, generation: int, month: str, fields: dict[str, int]
    ) -> Plan[int]:
        """Raise an API key's settled ``month`` to the snapshot's ``fields`` (``"req"``,
        ``"in"``, ``"out"``, ``"base"`` -> count) where Redis is behind them in the same
        ``generation`` (``payer_raise.lua``); the key's counters are trusted with its
        user's. Returns the base tokens added, also to the key's month and day."""
        uid = keys.user_id(user_id)
        base, user = self.keyspace.api_key(uid, key_id), self.keyspace.user(uid)
        return (yield from self._raise_payer(base, user, generation, month, fields))

    def raise_team(
        self, team: Any, generation: int, month: str, fields: dict[str, int]
    ) -> Plan[int]:
        """Raise a team's settled ``month`` (totals, ``|u:<uid>``, ``|m:<model>``) to the
        snapshot's ``fields``, as ``raise_key`` a key's, in the team's own slot."""
        base = self.keyspace.team(team)
        return (yield from self._raise_payer(base, base, generation, month, fields))

    def _raise_payer(
        self, base: str, trusted_by: str, generation: int, month: str, fields: dict[str, int]
    ) -> Plan[int]:
        now_arg, local_now = self.now_arg()
        today, current = day_and_month(local_now, self.timezone)
        day = today if month == current else ""
        pairs = [value for field, n in fields.items() for value in (field, int(n))]
        reply = yield ScriptCall(
            "payer_raise",
            (base, trusted_by),
            (
                now_arg, int(generation), month, month_end_ms(month, self.timezone),
                day, day_end_ms(today, self.timezone), *pairs,
            ),
        )  # fmt: skip
        return int(reply)

    def raise_global(
        self, day: str, day_total: int, month: str, month_total: int
    ) -> Plan[tuple[int, int]]:
        """Raise the global caps' counters of ``day`` and ``month`` to everyone's
        figures in the snapshots where Redis is behind them (``global_raise.lua``).
        Returns the base tokens added to the day and to the month."""
        r = yield ScriptCall(
            "global_raise",
            (self.keyspace.global_(),),
            (
                self.now_arg()[0], day, day_end_ms(day, self.timezone), int(day_total),
                month, month_end_ms(month, self.timezone), int(month_total),
            ),
        )  # fmt: skip
        return int(r[0]), int(r[1])

    # -- admin -------------------------------------------------------------------------

    def burn_resume(self, user_id: Any) -> Plan[bool]:
        """End the user's burn-rate pause (staff); True if they were paused. The
        breaker then waits one minute, until the spend that tripped it has left the
        window, before it may trip again."""
        return (yield from self._burn_resume(self.keyspace.user(keys.user_id(user_id))))

    def key_burn_resume(self, user_id: Any, key_id: Any) -> Plan[bool]:
        """End an API key's burn-rate pause (staff), as ``burn_resume`` a user's."""
        return (yield from self._burn_resume(self.keyspace.api_key(user_id, key_id)))

    def team_burn_resume(self, team_id: Any) -> Plan[bool]:
        """End a team's burn-rate pause (staff), as ``burn_resume`` a user's."""
        return (yield from self._burn_resume(self.keyspace.team(team_id)))

    def _burn_resume(self, base: str) -> Plan[bool]:
        reply = yield ScriptCall("burn_resume", (base,), (self.now_arg()[0],))
        return int(reply) == 1

    def burn_state(self, user_id: Any) -> Plan[BurnState]:
        """The user's breaker: paused until when, their baseline and last minute."""
        return (yield from self._burn_state(self.keyspace.user(keys.user_id(user_id))))

    def key_burn_state(self, user_id: Any, key_id: Any) -> Plan[BurnState]:
        """An API key's breaker, as ``burn_state`` a user's."""
        return (yield from self._burn_state(self.keyspace.api_key(user_id, key_id)))

    def team_burn_state(self, team_id: Any) -> Plan[BurnState]:
        """A team's breaker, as ``burn_state`` a user's."""
        return (yield from self._burn_state(self.keyspace.team(team_id)))

    def _burn_state(self, base: str) -> Plan[BurnState]:
        r = yield ScriptCall("burn_state", (base,), (self.now_arg()[0],))
        return BurnState(
            paused_until_ms=int(r[0]) or None,
            baseline_per_minute=int(r[1]),
            last_minute=int(r[2]),
            now_ms=int(r[3]),
        )

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
        return PeriodReset(text(r[0]), text(r[1]), int(r[2]), int(r[3]), int(r[4]))

    def reset_shares(self, bases: list[str], *, trusted: bool = False) -> Plan[list[int]]:
        """Forgive the current day and month of payers in one slot (a user's API keys,
        or a team), as ``reset_period`` does a user's; ``trusted`` marks a team's
        counters restored. Returns each payer's month counter before."""
        if not bases:
            return []
        now_arg, local_now = self.now_arg()
        r = yield ScriptCall(
            "share_reset",
            tuple(bases),
            (now_arg, self.ttl_ms, *period_args(local_now, self.timezone), 1 if trusted else 0),
        )
        return [int(value) for value in r[2:]]

    def reset_keys(self, user_id: Any, key_ids: list[Any]) -> Plan[list[int]]:
        """Forgive the current day and month of the user's API keys: their spend is part
        of the user's (the admin's reset)."""
        bases = [self.keyspace.api_key(user_id, key_id) for key_id in key_ids]
        return (yield from self.reset_shares(bases))

    def reset_team(self, team: Any) -> Plan[int]:
        """Forgive a team's current day and month; returns its month counter before."""
        before = yield from self.reset_shares([self.keyspace.team(team)], trusted=True)
        return before[0]


def _team_args(limits: Limits) -> tuple[Any, ...]:
    """A team's payer arguments: its label and its four limits."""
    return (
        "team.", _limit(limits.team_requests_per_minute),
        _limit(limits.team_max_concurrent_requests), _limit(limits.team_tokens_per_day),
        _limit(limits.team_tokens_per_month),
    )  # fmt: skip


def _team_suffixes(uid: str, model: str) -> str:
    """A team's usage is kept in total, by member and by model (``payer_usage``)."""
    return f",|u:{uid},|m:{model}"


def _burn_args(limits: Limits) -> tuple[float | int, int, int]:
    """The breaker's ARGV: all -1 (off) unless the tier sets all three."""
    return _breaker(limits.burn_multiplier, limits.burn_floor, limits.burn_pause)


def _team_burn_args(limits: Limits) -> tuple[float | int, int, int]:
    """The team's breaker's ARGV, from the team's tier, as ``_burn_args``."""
    return _breaker(limits.team_burn_multiplier, limits.team_burn_floor, limits.team_burn_pause)


def _breaker(
    mult: float | None, floor: int | None, pause: float | None
) -> tuple[float | int, int, int]:
    if mult is None or floor is None or pause is None:
        return -1, -1, -1
    return float(mult), int(floor), int(pause * 1000)


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
    r: list[Any],
    uid: str,
    rid: str,
    estimate: Estimate,
    *,
    uses_global: bool,
    api_key: str | None = None,
    team: str | None = None,
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
            api_key=api_key,
            team=team,
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
        burn_tripped=len(r) > 19 and int(r[19]) == 1,
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
