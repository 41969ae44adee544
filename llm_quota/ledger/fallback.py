"""What a process does while Redis is away.

``FallbackLimiter``: fail-open must not mean unlimited. Each process keeps its own
sliding minute per user, with the tier's per-minute limits divided by the number of
processes that share the load (``FAIL_OPEN_DIVISOR``), and the same per API key and
per team beside the user (a blind call passes every level or none). Budgets per day or
month can't be checked without Redis (what was spent is unknown), so each is spread over the
minutes left in its period (``token_share``): an outage of k minutes admits a user at
most about k / minutes-left of that budget, summed over the processes, instead of the
whole budget per minute per process.

``OutageJournal``: usage of calls that ran during the outage (admitted blind, or
admitted by Redis but settled after it went away) is kept and charged once Redis is
back. Settle is idempotent per reservation id, so replaying a settle that did reach
Redis before the connection broke changes nothing. With ``JOURNAL_DIR`` it is on disk
too, and outlives the process (``journal_file``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_quota.ledger.journal_file import JournalFile
from llm_quota.ledger.plans import Plan
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits
from llm_quota.rules.periods import day_and_month, day_end_ms, month_end_ms

logger = logging.getLogger("llm_quota")


def _share(limit: int | None, divisor: int) -> int | None:
    return None if limit is None else max(1, math.ceil(limit / divisor))


def _minutes_left(end_ms: int, now_ms: float) -> int:
    return max(1, math.ceil((end_ms - now_ms) / 60_000))


def token_share(limits: Limits, divisor: int, now: float, timezone: str = "UTC") -> int | None:
    """Base tokens one process may admit a user blind per minute, ``now`` (seconds since
    the epoch) in ``timezone``'s periods: the minute limit, the day's limit over the
    minutes left in the day, the month's over the minutes left in the month, whichever
    is least, divided among the processes (at least 1). None: no token limit."""
    return _spread(
        limits.tokens_per_minute, limits.tokens_per_day, limits.tokens_per_month,
        divisor, now, timezone,
    )  # fmt: skip


def _spread(
    per_minute: int | None,
    per_day: int | None,
    per_month: int | None,
    divisor: int,
    now: float,
    timezone: str,
) -> int | None:
    now_ms = now * 1000
    day, month = day_and_month(now_ms, timezone)
    rates: list[float] = []
    if per_minute is not None:
        rates.append(per_minute)
    if per_day is not None:
        rates.append(per_day / _minutes_left(day_end_ms(day, timezone), now_ms))
    if per_month is not None:
        rates.append(per_month / _minutes_left(month_end_ms(month, timezone), now_ms))
    return max(1, math.ceil(min(rates) / divisor)) if rates else None


@dataclass(frozen=True)
class _Level:
    """One payer's blind limits in this process: the user, or the API key or the team
    beside it. ``window``: the key of its sliding minute; ``label``: its refusals'
    prefix ('', 'key.', 'team.')."""

    window: str
    label: str
    rpm: int | None
    concurrent: int | None
    tpm: int | None


def _levels(user_id: str, limits: Limits, divisor: int, now: float, timezone: str) -> list[_Level]:
    """The user's level, then the key's and the team's where the call has them: a blind
    call, like a reserve, passes every payer's limits or none."""
    levels = [
        _Level(
            user_id, "", _share(limits.requests_per_minute, divisor),
            _share(limits.max_concurrent_requests, divisor),
            token_share(limits, divisor, now, timezone),
        )
    ]  # fmt: skip
    if limits.api_key is not None:
        levels.append(_Level(
            f"k:{user_id}:{limits.api_key}", "key.",
            _share(limits.key_requests_per_minute, divisor), None,
            _spread(None, limits.key_tokens_per_day, limits.key_tokens_per_month, divisor,
                    now, timezone),
        ))  # fmt: skip
    if limits.team is not None:
        levels.append(_Level(
            f"t:{limits.team}", "team.", _share(limits.team_requests_per_minute, divisor),
            _share(limits.team_max_concurrent_requests, divisor),
            _spread(None, limits.team_tokens_per_day, limits.team_tokens_per_month, divisor,
                    now, timezone),
        ))  # fmt: skip
    return levels


class FallbackLimiter:
    """Admits calls blind while Redis is away: a sliding minute per user, per process.

    The token share (``token_share``) has a floor: a user with nothing in this
    process' window is admitted one call whatever its size, so a budget whose share is
    smaller than one call (a small month) still lets one call a minute through per
    process instead of turning fail-open into fail-closed for that tier."""

    def __init__(
        self,
        divisor: int = 4,
        clock: Callable[[], float] = time.monotonic,
        *,
        timezone: str = "UTC",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.divisor = max(1, int(divisor))
        self.clock = clock
        self.timezone = timezone
        self.wall_clock = wall_clock
        self._windows: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self._in_flight: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def admit(self, user_id: str, limits: Limits, estimate: Estimate) -> str | None:
        """None if admitted (and counted at every level), else the name of the local
        limit that refused (``key.``/``team.`` before a key's or a team's)."""
        levels = _levels(user_id, limits, self.divisor, self.wall_clock(), self.timezone)
        cost = estimate.base_tokens
        now = self.clock()
        with self._lock:
            for level in levels:
                refused = self._refusal(level, cost, now)
                if refused is not None:
                    return level.label + refused
            for level in levels:
                self._windows[level.window].append((now, cost))
                self._in_flight[level.window] += 1
        return None

    def _refusal(self, level: _Level, cost: int, now: float) -> str | None:
        window = self._windows[level.window]
        while window and window[0][0] <= now - 60:
            window.popleft()
        if level.rpm is not None and len(window) + 1 > level.rpm:
            return "requests_per_minute"
        if level.concurrent is not None and self._in_flight[level.window] + 1 > level.concurrent:
            return "max_concurrent_requests"
        used = sum(t for _, t in window)
        if level.tpm is not None and used + cost > level.tpm and used > 0:  # the floor
            return "tokens_per_minute"
        return None

    def done(self, user_id: str, api_key: str | None = None, team: str | None = None) -> None:
        """A blind call ended: free its concurrency slot at every level it took one."""
        names = [user_id]
        if api_key is not None:
            names.append(f"k:{user_id}:{api_key}")
        if team is not None:
            names.append(f"t:{team}")
        with self._lock:
            for name in names:
                if self._in_flight.get(name, 0) > 0:
                    self._in_flight[name] -= 1


class OutageJournal:
    """Settles (and releases: usage ``None``) that could not reach Redis, replayed in
    order once it answers again. With a ``store`` (``JOURNAL_DIR``) each entry is also
    written to this process' file before ``record`` returns, so the process may die
    without losing it (``journal_file``); the memory copy is what this process replays."""

    def __init__(self, max_entries: int = 100_000, store: JournalFile | None = None) -> None:
        self.max_entries = max_entries
        self.store = store
        self._entries: deque[tuple[Any, ActualUsage | None, int]] = deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, reservation: Any, usage: ActualUsage | None) -> None:
        with self._lock:
            seq = self._write(reservation, usage)
            if len(self._entries) >= self.max_entries:
                _, _, oldest = self._entries.popleft()
                self._charged(oldest, empty=False)  # the new entry is in the file
                self.dropped += 1
                if self.dropped == 1:
                    logger.critical("outage journal full: the oldest settles are dropped")
            self._entries.append((reservation, usage, seq))

    def _write(self, reservation: Any, usage: ActualUsage | None) -> int:
        if self.store is None:
            return 0
        try:
            return self.store.append(reservation, usage)
        except OSError:
            # Memory still holds it: lost only if this process dies before Redis is back.
            logger.exception("journal: could not write reservation %s to disk", reservation.id)
            return 0

    def _charged(self, seq: int, *, empty: bool) -> None:
        if self.store is not None and seq:
            try:
                self.store.charged([seq], empty=empty)
            except OSError:
                logger.exception("journal: could not mark entry %d charged", seq)

    def _peek(self) -> tuple[Any, ActualUsage | None, int] | None:
        with self._lock:
            return self._entries[0] if self._entries else None

    def _done(self, reservation: Any) -> None:
        with self._lock:
            if self._entries and self._entries[0][0] is reservation:
                _, _, seq = self._entries.popleft()
                self._charged(seq, empty=not self._entries)

    def adopt(self) -> int:
        """Take the entries of dead processes' files into this journal (and this
        process' file, synced before theirs is unlinked); returns how many."""
        if self.store is None:
            return 0
        adopted = 0
        for path, entries in self.store.orphans():
            for reservation, usage in entries:
                self.record(reservation, usage)
            self.store.sync()
            adopted += len(entries)
            if not entries:
                continue  # a file whose entries were all charged: nothing to say
            logger.warning(
                "journal: adopted %d uncharged entries of a dead process (%s)",
                len(entries), path.name,
            )  # fmt: skip
        return adopted

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def replay(
        self, apply: Callable[[Any, ActualUsage | None], Plan[Any]], limit: int | None = None
    ) -> Plan[int]:
        """Charge entries in order through the plan ``apply`` makes of each (at most
        ``limit``); stops, keeping the rest, if one raises."""
        replayed = 0
        while limit is None or replayed < limit:
            entry = self._peek()
            if entry is None:
                break
            yield from apply(entry[0], entry[1])  # raises if Redis is gone again: keep it
            self._done(entry[0])
            replayed += 1
        _log_replayed(replayed)
        return replayed


def _log_replayed(replayed: int) -> None:
    if replayed:
        logger.warning("charged %d calls' usage recorded while Redis was away", replayed)
