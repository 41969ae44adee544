"""The lease keeper against a real Redis, in real time: a live call's lease is renewed
while it runs, a short call's never, and a forgotten one's lease expires. (The scripts
themselves, renew.lua and the caller's reservation id, are proven in ``test_ledger``.)"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time

import pytest
import redis
import redis.asyncio

from llm_quota import quota_guard
from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import leases
from tests.support import factories

# -- the keeper ----------------------------------------------------------------------

TTL = 1.5


@pytest.fixture
def short_ledger(redis_client, quota_prefix):
    """Redis' own clock and a 1.5 s lease: the keeper works in real time."""
    return Ledger(redis_client, prefix=quota_prefix, reservation_ttl=TTL)


@pytest.fixture
def model(db):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("one", is_default=True, max_concurrent_requests=1)
    return "gpt-4o"


@pytest.fixture
def renewals(short_ledger, monkeypatch):
    """The renewals the ledger is asked for."""
    seen = []
    perform = short_ledger.perform

    def counting(step):
        if getattr(step, "script", None) == "renew":
            seen.append(step.args[1])
        return perform(step)

    monkeypatch.setattr(short_ledger, "perform", counting)
    return seen


@pytest.mark.django_db
def test_a_call_shorter_than_a_third_of_the_ttl_is_never_renewed(short_ledger, model, renewals):
    user = factories.user()
    for _ in range(3):
        with quota_guard(user, model=model, prompt_tokens=10, ledger=short_ledger) as quota:
            quota.settle({"prompt_tokens": 10, "completion_tokens": 5})
    time.sleep(TTL)
    assert renewals == [] and len(leases.keeper()) == 0


@pytest.mark.django_db
def test_a_long_call_is_renewed_until_it_settles_then_never_again(short_ledger, model, renewals):
    user = factories.user()
    with quota_guard(user, model=model, prompt_tokens=10, ledger=short_ledger) as quota:
        time.sleep(2.5 * TTL)
        assert short_ledger.usage(user.pk).in_flight == 1, "still held after 2.5 TTLs"
        quota.settle({"prompt_tokens": 10, "completion_tokens": 5})
    assert len(renewals) >= 5 and set(renewals) == {quota.reservation.id}
    count = len(renewals)
    time.sleep(TTL)
    assert len(renewals) == count
    usage = short_ledger.usage(user.pk)
    assert (usage.in_flight, usage.reserved, usage.tokens_this_month) == (0, 0, 30)


@pytest.mark.django_db(transaction=True)  # the async guard reads the database in a thread
def test_an_async_call_is_renewed_by_the_same_keeper(short_ledger, model, renewals):
    user = factories.user()

    async def call():
        async with quota_guard(user, model=model, prompt_tokens=10, ledger=short_ledger) as quota:
            await asyncio.sleep(2 * TTL)
            await quota.asettle({"prompt_tokens": 10, "completion_tokens": 5})
        return quota

    quota = asyncio.run(call())
    assert renewals and set(renewals) == {quota.reservation.id}
    assert short_ledger.usage(user.pk).tokens_this_month == 30


@pytest.mark.django_db
def test_a_guard_forgotten_without_settling_is_not_kept_alive(short_ledger, model, renewals):
    """As for a process that dies: nothing renews the lease, so it expires."""
    user = factories.user()
    guard = quota_guard(user, model=model, prompt_tokens=10, ledger=short_ledger).admit()
    held = dataclasses.replace(guard.reservation)
    time.sleep(0.1)  # the keeper now sleeps until this lease is due
    del guard
    gc.collect()
    assert len(leases.keeper()) == 0, "the keeper holds no guard alive"
    time.sleep(TTL + 0.5)
    assert renewals == []
    usage = short_ledger.usage(user.pk)
    assert (usage.in_flight, usage.reserved) == (0, 0)
    assert short_ledger.renew(held) is False


@pytest.mark.django_db
def test_a_guard_held_but_never_finished_is_renewed_only_until_lease_max_seconds(
    short_ledger, model, renewals, settings, caplog
):
    """A stream nobody reads or closes, still referenced: past LEASE_MAX_SECONDS its
    lease is left to expire, so a concurrency-1 user is not held out for ever; if it
    settles after all, its usage is charged in full."""
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "LEASE_MAX_SECONDS": 2 * TTL}
    user = factories.user()
    guard = quota_guard(user, model=model, prompt_tokens=10, ledger=short_ledger).admit()
    time.sleep(1.5 * TTL)
    assert short_ledger.usage(user.pk).in_flight == 1, "renewed before its limit"
    time.sleep(2 * TTL)  # past the limit, and past the last renewal's lease
    assert len(leases.keeper()) == 0
    count = len(renewals)
    assert 2 <= count <= 6
    usage = short_ledger.usage(user.pk)
    assert (usage.in_flight, usage.reserved) == (0, 0)
    assert [r.getMessage() for r in caplog.records if "LEASE_MAX_SECONDS" in r.getMessage()]
    with quota_guard(user, model=model, prompt_tokens=10, ledger=short_ledger) as second:
        second.settle({"prompt_tokens": 10, "completion_tokens": 5})  # the slot is free
    guard.settle({"prompt_tokens": 10, "completion_tokens": 5})
    usage = short_ledger.usage(user.pk)
    assert (usage.in_flight, usage.reserved, usage.tokens_this_month) == (0, 0, 60)
    assert len(renewals) == count


@pytest.mark.django_db(transaction=True)
def test_a_call_on_an_async_ledger_of_its_own_is_renewed_on_its_loop(
    redis_client, quota_prefix, model
):
    user = factories.user()
    kwargs = redis_client.connection_pool.connection_kwargs

    async def call():
        aledger = AsyncLedger(
            redis.asyncio.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs["db"]),
            prefix=quota_prefix,
            reservation_ttl=TTL,
        )
        async with quota_guard(user, model=model, prompt_tokens=10, aledger=aledger) as quota:
            await asyncio.sleep(2 * TTL)
            in_flight = (await aledger.usage(user.pk)).in_flight
            await quota.asettle({"prompt_tokens": 10, "completion_tokens": 5})
        usage = await aledger.usage(user.pk)
        await aledger.aclose()
        return in_flight, usage

    in_flight, usage = asyncio.run(call())
    assert in_flight == 1, "held two TTLs after the reserve"
    assert (usage.in_flight, usage.reserved, usage.tokens_this_month) == (0, 0, 30)


@pytest.mark.django_db
def test_a_renewal_redis_cannot_take_is_tried_again_and_the_lease_survives(
    private_redis, quota_prefix, settings, model, caplog
):
    """Redis freezes when a renewal is due: the keeper's call times out (the breaker
    opens), and the renewal is tried again sooner, once Redis answers, before the lease
    runs out."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "BREAKER_COOLDOWN": 0.2}
    ttl = 3.0
    client = redis.Redis(
        port=private_redis.port, socket_timeout=0.3, socket_connect_timeout=0.3,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    ledger = Ledger(client, prefix=quota_prefix, reservation_ttl=ttl)
    user = factories.user()
    with quota_guard(user, model=model, prompt_tokens=10, ledger=ledger) as quota:
        time.sleep(ttl / 3 - 0.3)
        private_redis.freeze()  # the first renewal is due while Redis is frozen
        try:
            time.sleep(0.8)
        finally:
            private_redis.thaw()
        time.sleep(ttl * 0.7)  # past the first lease's end
        assert ledger.usage(user.pk).in_flight == 1, "the lease outlived its first TTL"
        assert any("Redis unavailable" in r.getMessage() for r in caplog.records)
        quota.settle({"prompt_tokens": 10, "completion_tokens": 5})
    usage = ledger.usage(user.pk)
    assert (usage.in_flight, usage.reserved, usage.tokens_this_month) == (0, 0, 30)
    client.close()
