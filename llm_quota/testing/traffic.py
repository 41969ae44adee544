"""A synthetic week of ordinary heavy use, and the runaway loop after it, replayed on
the ledger with a simulated clock: what ``llm_quota_runaway --report`` prints and the
burn-rate tests assert (contract §11).

The week is drawn from a fixed seed, so every run replays the same calls: working
hours on weekdays with a lunch peak, quiet evenings, light weekends, one day at three
times the usual pace, and a batch job every night. Calls are replayed through the
same ``reserve`` and ``settle`` scripts the gateway runs, on a pinned clock: a week
takes seconds, and Redis' own behaviour (the windows, the breaker) is real.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from llm_quota.ledger.replies import Reservation
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits, Price

DAY = 86_400
#: The replay's daily budget: the week's 3x day uses 40% of it, an ordinary day 15%.
DAILY_BUDGET = 3_000_000
#: When the loop starts: the Monday after the week, 10:00 (seconds into the replay).
LOOP_START = 7 * DAY + 10 * 3600
#: Calls a second of the loop: a worker on a fast upstream (the in-process replay
#: against the fake upstream runs faster still).
LOOP_PACE = 20
#: A Monday 00:00 UTC far ahead: Redis expires keys by its own clock, so a replay on a
#: past date would see its counters vanish as they are written.
REPLAY_MONDAY = 4_097_260_800  # 2099-11-02
#: gpt-4o's price shape: an output token costs four input tokens.
PRICE = Price("gpt-4o", 1_000_000, 4_000_000)


@dataclass(frozen=True)
class Call:
    """One LLM call: when it starts (seconds into the replay), its size, how long it runs."""

    at: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    seconds: float

    @property
    def base_tokens(self) -> int:
        return PRICE.base_tokens(self.prompt_tokens, self.output_tokens)


#: Calls a minute of one person at work, by hour of a weekday (09:00-18:00), lunch peak.
WORKDAY_RATE = {9: 0.2, 10: 0.3, 11: 0.3, 12: 0.6, 13: 0.5, 14: 0.3, 15: 0.3, 16: 0.25, 17: 0.15}
EVENING_RATE = 0.02  # 18:00-23:00 on weekdays, 10:00-18:00 on weekends
BUSY_DAY, BUSY_FACTOR = 2, 3  # Wednesday runs at three times the pace
BATCH_AT, BATCH_CALLS, BATCH_EVERY = 2 * 3600, 60, 10.0  # 02:00: 60 calls, one per 10 s


def _person(rng: random.Random, at: float) -> Call:
    prompt = int(rng.lognormvariate(math.log(600), 0.6))
    output = min(int(rng.lognormvariate(math.log(250), 0.5)), 1024)
    return Call(at, prompt, output, 1024, rng.uniform(1.0, 8.0))


def _batch(rng: random.Random, at: float) -> Call:
    return Call(at, rng.randint(1200, 1800), rng.randint(150, 300), 512, rng.uniform(2.0, 4.0))


def _poisson(rng: random.Random, start: float, end: float, per_minute: float) -> Iterator[float]:
    at = start
    while per_minute > 0:
        at += rng.expovariate(per_minute / 60)
        if at >= end:
            return
        yield at


def synthetic_week(seed: int = 15) -> list[Call]:
    """Seven days from a Monday 00:00 (second 0), in time order."""
    rng = random.Random(seed)
    calls: list[Call] = []
    for day in range(7):
        midnight = day * DAY
        start = midnight + BATCH_AT
        calls += [_batch(rng, start + i * BATCH_EVERY) for i in range(BATCH_CALLS)]
        factor = BUSY_FACTOR if day == BUSY_DAY else 1
        if day < 5:
            for hour, rate in WORKDAY_RATE.items():
                span = (midnight + hour * 3600, midnight + (hour + 1) * 3600)
                calls += [_person(rng, at) for at in _poisson(rng, *span, rate * factor)]
            evening = (midnight + 18 * 3600, midnight + 23 * 3600)
            calls += [_person(rng, at) for at in _poisson(rng, *evening, EVENING_RATE)]
        else:
            daytime = (midnight + 10 * 3600, midnight + 18 * 3600)
            calls += [_person(rng, at) for at in _poisson(rng, *daytime, EVENING_RATE)]
    return sorted(calls, key=lambda c: c.at)


def runaway_loop(start: float, seconds: float = 120, pace: float = LOOP_PACE) -> list[Call]:
    """The incident: one worker calling as fast as it can (``pace`` calls a second,
    each answered in 1/pace s), the same request every time, for ``seconds``."""
    step = 1 / pace
    return [Call(start + i * step, 700, 256, 256, step * 0.9) for i in range(int(seconds * pace))]


@dataclass
class Replay:
    """What a replay saw: refusals by limit, and the first one after ``watch_from``."""

    spent: int = 0
    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    trips: list[float] = field(default_factory=list)
    first_refusal: tuple[float, str] | None = None
    spent_before_refusal: int = 0


def replay(
    ledger: Ledger, clock: _Clock, user_id: str, calls: list[Call], limits: Limits
) -> Replay:
    """Reserve each call at its start and settle it when it ends, in time order, on
    ``clock`` (the ledger's pinned clock). A refused call is not retried."""
    seen = Replay()
    events: list[tuple[float, int, int, Call]] = [(c.at, 0, i, c) for i, c in enumerate(calls)]
    heapq.heapify(events)
    held: dict[int, Reservation] = {}
    while events:
        at, kind, i, call = heapq.heappop(events)
        clock.now = clock.origin + at
        if kind == 1:
            ledger.settle(held.pop(i), ActualUsage(call.prompt_tokens, call.output_tokens))
            seen.spent += call.base_tokens
            continue
        decision = ledger.reserve(
            user_id, limits, Estimate(PRICE, call.prompt_tokens, call.max_tokens), clamp=False
        )
        if decision.reservation is not None:
            seen.admitted += 1
            held[i] = decision.reservation
            heapq.heappush(events, (at + call.seconds, 1, i, call))
            continue
        limit = decision.limit or "unknown"
        seen.refused[limit] = seen.refused.get(limit, 0) + 1
        if decision.burn_tripped:
            seen.trips.append(at)
        if seen.first_refusal is None:
            seen.first_refusal = (at, limit)
            seen.spent_before_refusal = seen.spent + sum(
                c.base_tokens for _, k, _, c in events if k == 1
            )
    return seen


class _Clock:
    """The pinned clock a replay moves: seconds since the epoch, from ``origin``."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.now = origin

    def __call__(self) -> float:
        return self.now


def pinned_clock(origin: float) -> _Clock:
    """A clock for ``Ledger(clock=...)`` that ``replay`` moves; ``origin`` should be a
    Monday 00:00 in the ledger's time zone, for the week's hours to mean what they say."""
    return _Clock(origin)


@dataclass(frozen=True)
class Incident:
    """The week, then the loop: what each replay saw."""

    week: Replay
    loop: Replay

    @property
    def seconds_to_stop(self) -> float | None:
        if self.loop.first_refusal is None:
            return None
        return self.loop.first_refusal[0] - LOOP_START


def replay_incident(ledger: Ledger, clock: _Clock, user_id: str, limits: Limits) -> Incident:
    """The synthetic week, then the runaway loop, for one user under ``limits``."""
    week = replay(ledger, clock, user_id, synthetic_week(), limits)
    return Incident(week, replay(ledger, clock, user_id, runaway_loop(LOOP_START), limits))
