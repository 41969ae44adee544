"""The unit group runs with no Redis and no server: ``make test-fast``.

A unit test that opens a Redis connection fails here, rather than passing quietly on
a fail-open path: such a test belongs in ``tests/integration``.
"""

from __future__ import annotations

import pytest
import redis
import redis.asyncio.connection

from llm_quota.rules.config_cache import config_cache


@pytest.fixture(autouse=True)
def no_redis(monkeypatch):
    def refuse(self, *args, **kwargs):
        pytest.fail("a unit test opened a Redis connection: move it to tests/integration")

    monkeypatch.setattr(redis.connection.AbstractConnection, "connect", refuse)
    monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "connect", refuse)
    # A cached read would start the config listener, a Redis subscription: here rows
    # come from the database alone, and no test sees another's cached rows.
    monkeypatch.setattr(config_cache, "before_read", None)
    config_cache.invalidate()
    yield
    config_cache.invalidate()
