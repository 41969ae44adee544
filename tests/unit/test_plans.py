"""The plans and their drivers, with scripted steps: what a plan decides does not
depend on Redis, so it is proven here without one."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from llm_quota.ledger import resilience
from llm_quota.ledger.breaker import HALF_OPEN, OPEN
from llm_quota.ledger.ops import LedgerOps
from llm_quota.ledger.plans import ScriptCall, UseLedger, adrive, drive
from llm_quota.ledger.replies import Reservation
from llm_quota.ledger.resilience import outage, resilient


def _undoing_plan(log):
    """Two steps; if the second fails, the first is undone before the error goes on."""
    yield ScriptCall("first", (), ())
    try:
        yield ScriptCall("second", (), ())
    except BaseException as exc:
        log.append(f"undo after {type(exc).__name__}")
        yield ScriptCall("undo", (), ())
        raise
    return "done"


def test_a_failed_step_is_thrown_into_the_plan_which_undoes_before_raising():
    log, sent = [], []

    def perform(step):
        sent.append(step.script)
        if step.script == "second":
            raise RedisConnectionError("gone")

    with pytest.raises(RedisConnectionError):
        drive(_undoing_plan(log), perform)
    assert sent == ["first", "second", "undo"] and log == ["undo after ConnectionError"]


def test_an_interrupt_reaches_the_plan_in_the_sync_driver_too():
    log, sent = [], []

    def perform(step):
        sent.append(step.script)
        if step.script == "second":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drive(_undoing_plan(log), perform)
    assert sent[-1] == "undo" and log == ["undo after KeyboardInterrupt"]


def test_a_cancellation_reaches_the_plan_on_an_event_loop():
    log, sent = [], []

    async def perform(step):
        sent.append(step.script)
        if step.script == "second":
            await asyncio.sleep(10)

    async def main():
        task = asyncio.ensure_future(adrive(_undoing_plan(log), perform))
        while "second" not in sent:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sent[-1] == "undo" and log == ["undo after CancelledError"]


class _Ledger:
    ops = None


def _operation(ledger):
    return (yield ScriptCall("reserve", (), ()))


@pytest.fixture
def state():
    resilience.reset()
    yield outage()
    resilience.reset()


def test_an_open_breaker_keeps_the_plan_off_redis(state):
    state.breaker.failure()
    sent = []
    result = drive(resilient(_operation, lambda error: ("blind", error)), sent.append)
    assert result == ("blind", None) and sent == []  # not even the ledger was asked for


def test_redis_unreachable_opens_the_breaker_and_falls_back(state):
    def perform(step):
        if isinstance(step, UseLedger):
            return _Ledger()
        raise RedisConnectionError("refused")

    result = drive(resilient(_operation, lambda error: ("blind", error)), perform)
    assert result[0] == "blind" and isinstance(result[1], RedisConnectionError)
    assert state.breaker.state == OPEN


def test_a_probe_cut_short_without_an_answer_opens_the_breaker_again(state):
    state.breaker.failure()
    state.breaker.opened_at -= state.breaker.cooldown  # the cooldown is over: next is a probe
    seen = []

    def perform(step):
        if isinstance(step, UseLedger):
            seen.append(state.breaker.state)
            return _Ledger()
        raise KeyboardInterrupt  # cancelled: no answer, and no error from Redis

    with pytest.raises(KeyboardInterrupt):
        drive(resilient(_operation, lambda error: "blind"), perform)
    assert seen == [HALF_OPEN]  # this call was the probe
    assert state.breaker.state == OPEN  # not left half-open, refusing every later probe


def _ledger_with(ops):
    class Ledger:
        pass

    Ledger.ops = ops
    return Ledger()


def test_the_journal_is_charged_before_the_decision_that_finds_redis_back(state):
    """What an outage left (here the release of a reserve whose reply was lost) reaches
    Redis before the next reserve, so that reserve is not refused by a phantom."""
    ops = LedgerOps(prefix="t")
    state.breaker.failure()
    state.breaker.opened_at -= state.breaker.cooldown  # the next call probes
    state.defer(_reservation("ab"), None)
    sent = []

    def perform(step):
        if isinstance(step, UseLedger):
            return _ledger_with(ops)
        sent.append((step.script, step.args[1] if step.script == "release" else None))
        return 1 if step.script == "release" else "reserved"

    assert drive(resilient(_operation, lambda error: "blind"), perform) == "reserved"
    assert sent == [("release", "ab" * 16), ("reserve", None)]
    assert len(state.journal) == 0 and state.breaker.state == "closed"


def test_a_journal_that_finds_redis_gone_again_keeps_the_call_off_it(state):
    ops = LedgerOps(prefix="t")
    state.defer(_reservation("ab"), None)
    sent = []

    def perform(step):
        if isinstance(step, UseLedger):
            return _ledger_with(ops)
        sent.append(step.script)
        raise RedisConnectionError("gone")

    result = drive(resilient(_operation, lambda error: ("blind", error)), perform)
    assert result[0] == "blind" and sent == ["release"]  # one timeout paid, not two
    assert len(state.journal) == 1 and state.breaker.state == OPEN


@pytest.mark.parametrize(
    "failure, journaled",
    [
        (RedisConnectionError("reply lost"), True),
        (KeyboardInterrupt(), True),
        (ResponseError("script error: Redis answered"), False),
    ],
)
def test_a_reserve_whose_reply_never_came_journals_a_release_of_its_id(state, failure, journaled):
    lost = _reservation("cd")

    def reserve():
        yield ScriptCall("reserve", (), (0, lost.id))

    def perform(step):
        raise failure

    with pytest.raises(type(failure)):
        drive(resilience.reply_lost_released(reserve(), lost), perform)
    assert len(state.journal) == (1 if journaled else 0)


def _reservation(rid):
    return Reservation(
        id=rid * 16, user_id="1", model="m", reserved=0, max_tokens=1,
        estimate=None, day="20991127", month="209911", month_end_ms=0, uses_global=False,
    )  # fmt: skip


def test_the_month_grace_python_knows_is_the_one_the_scripts_keep():
    # The snapshot stops copying a closed month when Redis drops its counters; the two
    # figures must move together.
    from pathlib import Path

    from llm_quota.rules.periods import MONTH_GRACE_MS

    common = (Path(__file__).parents[2] / "llm_quota/ledger/lua/common.lua").read_text()
    assert f"local MONTH_GRACE = {MONTH_GRACE_MS // 86_400_000} * 86400000" in common
