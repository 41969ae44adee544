"""Calendar days and months in ``PERIOD_TIMEZONE``, as the Lua scripts receive them.

Lua cannot do time zones (DST), so the caller sends the previous, current and next
period ids with their start instants and the script picks by Redis' clock. The
instants are cached per day: building them costs more than the rest of a reserve.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


@lru_cache(maxsize=256)
def _periods(today: date, tz_name: str) -> tuple[str, str, str, str]:
    """Previous, current and next day and month, with their start instants (ms)."""
    tz = ZoneInfo(tz_name)

    def start(d: date) -> int:
        return int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp() * 1000)

    days = [today + timedelta(days=n) for n in (-1, 0, 1, 2)]
    first = today.replace(day=1)
    months = [add_months(first, n) for n in (-1, 0, 1, 2)]
    return (
        ",".join(d.strftime("%Y%m%d") for d in days[:3]),
        ",".join(str(start(d)) for d in days),
        ",".join(d.strftime("%Y%m") for d in months[:3]),
        ",".join(str(start(d)) for d in months),
    )


def add_months(first: date, n: int) -> date:
    """The first day of the month ``n`` months after (or before) ``first``'s."""
    index = first.year * 12 + first.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def first_day(month: str) -> date:
    """The first day of the month ``YYYYMM`` (a ``UsageSnapshot``'s period)."""
    return date(int(month[:4]), int(month[4:6]), 1)


def period_args(now_ms: float, tz_name: str) -> tuple[str, str, str, str]:
    """Day ids, day starts, month ids, month starts around ``now_ms`` (CSV strings)."""
    today = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(tz_name)).date()
    return _periods(today, tz_name)


def current_month(now: float | None = None, tz_name: str = "UTC") -> str:
    moment = time.time() if now is None else now
    return datetime.fromtimestamp(moment, ZoneInfo(tz_name)).strftime("%Y%m")


#: How long the ledger keeps a closed month's counters after its end (``MONTH_GRACE`` in
#: ``ledger/lua/common.lua``): late settles land there, and the snapshot copies them.
MONTH_GRACE_MS = 8 * 86_400_000


def month_end_ms(month: str, tz_name: str) -> int:
    """The instant (ms) the month ``YYYYMM`` ends in ``tz_name``."""
    nxt = add_months(first_day(month), 1)
    return int(datetime(nxt.year, nxt.month, 1, tzinfo=ZoneInfo(tz_name)).timestamp() * 1000)


def day_end_ms(day: str, tz_name: str) -> int:
    """The instant (ms) the day ``YYYYMMDD`` ends in ``tz_name``."""
    nxt = date(int(day[:4]), int(day[4:6]), int(day[6:8])) + timedelta(days=1)
    return int(datetime(nxt.year, nxt.month, nxt.day, tzinfo=ZoneInfo(tz_name)).timestamp() * 1000)


def day_id(day: date | None) -> str:
    """A stored date as the ledger names days (``YYYYMMDD``); ``""`` for none."""
    return "" if day is None else day.strftime("%Y%m%d")


def previous_month(month: str) -> str:
    return add_months(first_day(month), -1).strftime("%Y%m")


def month_start(month: str, tz_name: str) -> datetime:
    first = first_day(month)
    return datetime(first.year, first.month, 1, tzinfo=ZoneInfo(tz_name))


def day_and_month(now_ms: float, tz_name: str) -> tuple[str, str]:
    """The day and month ids (``YYYYMMDD``, ``YYYYMM``) of ``now_ms`` in ``tz_name``."""
    moment = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(tz_name))
    return moment.strftime("%Y%m%d"), moment.strftime("%Y%m")
