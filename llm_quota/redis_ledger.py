"""The Redis ledger: the only place where quota is counted.

Each operation is one Lua script run by EVALSHA, so a gated request costs one round
trip to reserve and one to settle, and no two requests can interleave between a check
and its increment. The scripts live in ``lua/``; ``common.lua`` documents the key
layout and is prepended to each.

This module knows nothing of HTTP or the ORM: it takes a redis-py client, plain
limits and a priced estimate. ``get_ledger()`` builds the project's ledger from
settings.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import cache, lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from llm_quota import keys
from llm_quota.accounting import ActualUsage, Estimate, Limits

LUA_DIR = Path(__file__).with_name("lua")

#: Limits whose refusal a retry within the period cannot cure (OpenAI: insufficient_quota).
BUDGET_LIMITS = frozenset(
    {
        "tokens_per_day",
        "tokens_per_month",
        "global_tokens_per_day",
        "global_tokens_per_month",
        "max_tokens_per_request",
    }
)


@cache
def script_source(name: str) -> str:
    return (LUA_DIR / "common.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limit(value: int | None) -> int:
    return -1 if value is None else int(value)


# -- periods -----------------------------------------------------------------------


@lru_cache(maxsize=256)
def _periods(today: date, tz_name: str) -> tuple[str, str, str, str]:
    """Previous, current and next day and month, with their start instants (ms)."""
    tz = ZoneInfo(tz_name)

    def start(d: date) -> int:
        return int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp() * 1000)

    days = [today + timedelta(days=n) for n in (-1, 0, 1, 2)]
    first = today.replace(day=1)
    months = [_add_months(first, n) for n in (-1, 0, 1, 2)]
    return (
        ",".join(d.strftime("%Y%m%d") for d in days[:3]),
        ",".join(str(start(d)) for d in days),
        ",".join(d.strftime("%Y%m") for d in months[:3]),
        ",".join(str(start(d)) for d in months),
    )


def _add_months(first: date, n: int) -> date:
    index = first.year * 12 + first.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def period_args(now_ms: float, tz_name: str) -> tuple[str, str, str, str]:
    today = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(tz_name)).date()
    return _periods(today, tz_name)


def current_month(now: float | None = None, tz_name: str = "UTC") -> str:
    moment = time.time() if now is None else now
    return datetime.fromtimestamp(moment, ZoneInfo(tz_name)).strftime("%Y%m")


# -- results -----------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    """A held estimate. Hand it to ``settle`` or ``release``; both are idempotent."""

    id: str
    user_id: str
    model: str
    reserved: int
    max_tokens: int
    estimate: Estimate | None
    day: str
    month: str
    month_end_ms: int
    uses_global: bool
    #: Admitted without Redis (fail-open): settling it records nothing here.
    unmetered: bool = False


@dataclass(frozen=True)
class Decision:
    """What ``reserve`` decided, with the figures the HTTP headers report."""

    allowed: bool
    limit: str | None
    retry_after: float
    reservation: Reservation | None
    requested_max_tokens: int
    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset: float = 0.0
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset: float = 0.0

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds, rounded up and never 0 (``Retry-After: 0`` invites a hammering)."""
        return max(1, math.ceil(self.retry_after))

    @property
    def is_budget(self) -> bool:
        return self.limit in BUDGET_LIMITS

    @property
    def max_tokens(self) -> int:
        return self.reservation.max_tokens if self.reservation else 0

    @property
    def clamped(self) -> bool:
        return self.reservation is not None and self.max_tokens < self.requested_max_tokens


@dataclass(frozen=True)
class Settlement:
    settled: bool
    late: bool
    charged_delta: int
    #: The reservation's month and its settled base tokens after this settle (None
    #: when nothing was settled): what the soft-limit alert compares, at no extra cost.
    month: str = ""
    month_used: int | None = None
    #: Base tokens this settle charged for the request.
    base_tokens: int = 0


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    base_tokens: int = 0


@dataclass(frozen=True)
class UserUsage:
    """A user's live counters, as the next decision would see them."""

    day: str
    month: str
    day_end_ms: int
    month_end_ms: int
    tokens_today: int
    tokens_this_month: int
    reserved: int
    requests_this_minute: int
    tokens_this_minute: int
    in_flight: int
    by_model: list[ModelUsage] = field(default_factory=list)

    @property
    def settled_this_month(self) -> int:
        """Base tokens settled this month (``tokens_this_month`` less what is reserved)."""
        return sum(row.base_tokens for row in self.by_model)


@dataclass(frozen=True)
class PeriodReset:
    """What ``reset_period`` did: the month counter before and what stays in flight."""

    day: str
    month: str
    tokens_before: int
    tokens_after: int


def parse_model_fields(pairs: Iterable[Any]) -> list[ModelUsage]:
    """``["req|gpt-4o", 3, "in|gpt-4o", 100, ...]`` (or a dict) into rows per model."""
    items = pairs.items() if isinstance(pairs, dict) else zip(*[iter(pairs)] * 2, strict=True)
    per_model: dict[str, dict[str, int]] = {}
    names = {"req": "requests", "in": "input_tokens", "out": "output_tokens", "base": "base_tokens"}
    for raw_field, raw_value in items:
        kind, _, model = _text(raw_field).partition("|")
        if kind in names and model:
            per_model.setdefault(model, {})[names[kind]] = int(_text(raw_value))
    return [ModelUsage(model, **values) for model, values in sorted(per_model.items())]


RestoreSource = Callable[[str, str], tuple[int, list[ModelUsage]]]


# -- the ledger --------------------------------------------------------------------


class Ledger:
    """Reserve, settle and release against one Redis, atomically.

    ``clock`` pins time (seconds since the epoch) for tests and replays; without it the
    scripts use Redis' own clock. ``restore`` returns a user's month from the
    database when Redis has lost it (``(base_tokens, [ModelUsage, ...])``).
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "llmq",
        reservation_ttl: int = 600,
        timezone: str = "UTC",
        clock: Callable[[], float] | None = None,
        restore: RestoreSource | None = None,
    ) -> None:
        self.client = client
        self.keyspace = keys.KeySpace(prefix)
        self.ttl_ms = int(reservation_ttl * 1000)
        self.timezone = timezone
        ZoneInfo(timezone)  # fail now, not on the first request
        self.clock = clock
        self.restore_source = restore
        self._scripts = {
            name: client.register_script(script_source(name))
            for name in ("reserve", "settle", "release", "usage", "restore", "reset")
        }

    # Time: 0 tells a script to use Redis' clock; periods still need a local guess,
    # and the script picks among previous/current/next by its own clock.
    def _now_arg(self) -> tuple[int, float]:
        if self.clock is not None:
            now = int(self.clock() * 1000)
            return now, now
        return 0, time.time() * 1000

    def reserve(
        self,
        user_id: Any,
        limits: Limits,
        estimate: Estimate,
        *,
        clamp: bool = True,
        min_output_tokens: int = 16,
    ) -> Decision:
        uid = keys.user_id(user_id)
        model = keys.model_name(estimate.model)
        rid = keys.reservation_id()
        base = self.keyspace.user(uid)
        now_arg, local_now = self._now_arg()
        days, day_starts, months, month_starts = period_args(local_now, self.timezone)
        args = [
            now_arg, rid, self.ttl_ms,
            _limit(limits.requests_per_minute), _limit(limits.max_concurrent_requests),
            _limit(limits.tokens_per_minute), _limit(limits.tokens_per_day),
            _limit(limits.tokens_per_month), _limit(limits.global_tokens_per_day),
            _limit(limits.global_tokens_per_month),
            estimate.prompt_micro, estimate.price.output_micro, estimate.max_output_tokens,
            max(0, min_output_tokens), 1 if clamp else 0,
            model, days, day_starts, months, month_starts,
        ]  # fmt: skip
        script_keys = [base, self.keyspace.global_()]
        result = self._scripts["reserve"](keys=script_keys, args=args)
        if int(result[0]) == 2:
            self.restore(uid, _text(result[7]))
            result = self._scripts["reserve"](keys=script_keys, args=args)
        return self._decision(result, uid, rid, estimate, limits)

    def _decision(
        self, r: list[Any], uid: str, rid: str, estimate: Estimate, limits: Limits
    ) -> Decision:
        status, limit = int(r[0]), _text(r[1]) or None
        reservation = None
        if status == 1:
            month = _text(r[7])
            reservation = Reservation(
                id=rid,
                user_id=uid,
                model=estimate.model,
                reserved=int(r[4]),
                max_tokens=int(r[3]),
                estimate=estimate,
                day=_text(r[6]),
                month=month,
                month_end_ms=int(r[14]),
                uses_global=(
                    limits.global_tokens_per_day is not None
                    or limits.global_tokens_per_month is not None
                ),
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
        )

    def settle(self, reservation: Reservation, usage: ActualUsage) -> Settlement:
        """Replace the estimate by the real usage; a second call changes nothing."""
        if reservation.unmetered:
            return Settlement(False, False, 0)
        if reservation.estimate is not None:
            price = reservation.estimate.price
        else:  # pragma: no cover - reservations are built by reserve()
            raise ValueError("a reservation without its estimate cannot be priced")
        actual = price.base_tokens(
            usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
        )
        now_arg, _ = self._now_arg()
        result = self._scripts["settle"](
            keys=[
                self.keyspace.user(reservation.user_id),
                self.keyspace.global_(),
                self.keyspace.index(),
            ],
            args=[
                now_arg, keys.reservation_id(reservation.id), self.ttl_ms, reservation.user_id,
                actual, usage.input_tokens, usage.output_tokens,
                reservation.day, reservation.month, reservation.month_end_ms,
                1 if reservation.uses_global else 0, keys.model_name(reservation.model),
            ],
        )  # fmt: skip
        outcome = int(result[0])
        if outcome not in (1, 2):
            return Settlement(False, False, 0)
        return Settlement(
            settled=True,
            late=outcome == 2,
            charged_delta=int(result[1]),
            month=reservation.month,
            month_used=int(result[2]),
            base_tokens=actual,
        )

    def release(self, reservation: Reservation) -> bool:
        """Give the whole estimate back (a failed call); a second call changes nothing."""
        if reservation.unmetered:
            return False
        now_arg, _ = self._now_arg()
        result = self._scripts["release"](
            keys=[self.keyspace.user(reservation.user_id), self.keyspace.global_()],
            args=[now_arg, keys.reservation_id(reservation.id), self.ttl_ms],
        )
        return int(result) == 1

    def usage(self, user_id: Any) -> UserUsage:
        """The user's live counters; lost ones are restored first, as reserve would."""
        return self.usage_many([user_id])[keys.user_id(user_id)]

    def usage_many(self, user_ids: Iterable[Any]) -> dict[str, UserUsage]:
        """Live counters of many users in one round trip (the admin's change list)."""
        uids = list(dict.fromkeys(keys.user_id(u) for u in user_ids))
        results = dict(zip(uids, self._usage_round_trip(uids), strict=True))
        lost = [uid for uid, r in results.items() if not int(r[12])]
        if lost and self.restore_source is not None:
            for uid in lost:
                self.restore(uid, _text(results[uid][2]))
            results.update(zip(lost, self._usage_round_trip(lost), strict=True))
        return {uid: self._user_usage(r) for uid, r in results.items()}

    def _usage_round_trip(self, uids: list[str]) -> list[Any]:
        now_arg, local_now = self._now_arg()
        days, day_starts, months, month_starts = period_args(local_now, self.timezone)
        args = [now_arg, self.ttl_ms, days, day_starts, months, month_starts]
        script = self._scripts["usage"]
        if len(uids) == 1:  # a plain EVALSHA; a pipeline would first ask SCRIPT EXISTS
            return [script(keys=[self.keyspace.user(uids[0]), self.keyspace.global_()], args=args)]
        pipe = self.client.pipeline(transaction=False)
        for uid in uids:
            script(keys=[self.keyspace.user(uid), self.keyspace.global_()], args=args, client=pipe)
        return list(pipe.execute()) if uids else []

    @staticmethod
    def _user_usage(r: list[Any]) -> UserUsage:
        return UserUsage(
            day=_text(r[1]),
            month=_text(r[2]),
            day_end_ms=int(r[3]),
            month_end_ms=int(r[4]),
            tokens_today=int(r[5]),
            tokens_this_month=int(r[6]),
            reserved=int(r[7]),
            requests_this_minute=int(r[8]),
            tokens_this_minute=int(r[9]),
            in_flight=int(r[10]),
            by_model=parse_model_fields(r[11]),
        )

    def restore(self, user_id: Any, month: str) -> bool:
        """Add the database's record of ``month`` (and the month before) back, once per loss."""
        uid = keys.user_id(user_id)
        args: list[Any] = [uid, self._now_arg()[0]]
        for period in (month, _previous_month(month)):
            total, rows = (0, [])
            if self.restore_source is not None:
                total, rows = self.restore_source(uid, period)
            pairs: list[Any] = []
            for row in rows:
                model = keys.model_name(row.model)
                pairs += [
                    f"req|{model}", row.requests, f"in|{model}", row.input_tokens,
                    f"out|{model}", row.output_tokens, f"base|{model}", row.base_tokens,
                ]  # fmt: skip
            month_end = _month_end_ms(period, self.timezone)
            args += [period, month_end, int(total), len(pairs), *pairs]
        result = self._scripts["restore"](
            keys=[self.keyspace.user(uid), self.keyspace.index()], args=args
        )
        return int(result) == 1

    def reset_period(self, user_id: Any) -> PeriodReset:
        """Forgive the user's usage of the current day and month, atomically.

        Requests in flight keep their reservations (they settle against the reset
        counters); settled usage and the month's per-model figures go.
        """
        uid = keys.user_id(user_id)
        now_arg, local_now = self._now_arg()
        days, day_starts, months, month_starts = period_args(local_now, self.timezone)
        r = self._scripts["reset"](
            keys=[self.keyspace.user(uid), self.keyspace.global_(), self.keyspace.index()],
            args=[now_arg, self.ttl_ms, uid, days, day_starts, months, month_starts],
        )
        return PeriodReset(_text(r[0]), _text(r[1]), int(r[2]), int(r[3]))

    def now_ms(self) -> int:
        """The ledger's time: the pinned clock, else Redis' own (as the scripts use)."""
        if self.clock is not None:
            return int(self.clock() * 1000)
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def periods(self, now_ms: int | None = None) -> tuple[str, str]:
        """The current day and month ids (``YYYYMMDD``, ``YYYYMM``) in the period zone."""
        moment = datetime.fromtimestamp(
            (self.now_ms() if now_ms is None else now_ms) / 1000, ZoneInfo(self.timezone)
        )
        return moment.strftime("%Y%m%d"), moment.strftime("%Y%m")


def _previous_month(month: str) -> str:
    first = _add_months(date(int(month[:4]), int(month[4:6]), 1), -1)
    return first.strftime("%Y%m")


def month_start(month: str, tz_name: str) -> datetime:
    return datetime(int(month[:4]), int(month[4:6]), 1, tzinfo=ZoneInfo(tz_name))


def _month_end_ms(month: str, tz_name: str) -> int:
    first = date(int(month[:4]), int(month[4:6]), 1)
    nxt = _add_months(first, 1)
    return int(datetime(nxt.year, nxt.month, 1, tzinfo=ZoneInfo(tz_name)).timestamp() * 1000)


# -- the project's ledger ------------------------------------------------------------

_default: Ledger | None = None
_default_lock = threading.Lock()


def get_ledger() -> Ledger:
    """The ledger built from ``LLM_QUOTA`` settings and the django-redis cache client."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                from django_redis import get_redis_connection

                from llm_quota.conf import quota_settings
                from llm_quota.restore import month_from_snapshots

                _default = Ledger(
                    get_redis_connection(quota_settings.REDIS_CACHE_ALIAS),
                    prefix=quota_settings.KEY_PREFIX,
                    reservation_ttl=quota_settings.RESERVATION_TTL,
                    timezone=quota_settings.PERIOD_TIMEZONE,
                    restore=month_from_snapshots,
                )
    return _default


def set_default_ledger(ledger: Ledger | None) -> None:
    """Swap the project's ledger (tests pin a clock or a prefix this way)."""
    global _default
    _default = ledger


def reset_default_ledger() -> None:
    set_default_ledger(None)
