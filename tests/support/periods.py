"""Calendar periods of the pinned test clock, so that no test hard-codes a date.

The pinned clock sits far in the future (Redis expires keys by its real clock);
tests that derive their periods from it keep working wherever it is set.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta


def now(clock) -> datetime:
    return datetime.fromtimestamp(clock(), UTC)


def month_start(clock, back: int = 0) -> date:
    """First day of the clock's month, or of the month ``back`` months before it."""
    moment = now(clock)
    index = moment.year * 12 + moment.month - 1 - back
    return date(index // 12, index % 12 + 1, 1)


def month_id(clock, back: int = 0) -> str:
    return month_start(clock, back).strftime("%Y%m")


def day_id(clock) -> str:
    return now(clock).strftime("%Y%m%d")


def next_month_start(clock) -> date:
    return (month_start(clock) + timedelta(days=32)).replace(day=1)


def keep_room(clock, days: int) -> None:
    """Move the clock back within its month if ``days`` more would leave the month.

    Only when needed: an earlier day of the month may already have expired in real
    time (Redis expires a day counter a day after its day ends, by its own clock).
    """
    if (now(clock) + timedelta(days=days)).month != now(clock).month:
        start = month_start(clock)
        clock.set(datetime(start.year, start.month, 2, 12, 0, tzinfo=UTC))
