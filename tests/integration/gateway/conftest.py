"""Fixtures: the live server's gateway, and the tests' own upstreams behind it."""

from __future__ import annotations

import pytest

from tests.support import factories
from tests.support.fake_upstream import UpstreamServer
from tests.support.gateway import Gateway
from tests.support.oracle_upstream import OracleServer


@pytest.fixture
def gateway(live_server, quota_prefix):
    """The live server's ``/v1``; prices for the fake provider's and the upstream's models."""
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=200)
    factories.price("gpt-4o-mini", "0.06", "0.24", default_max_output_tokens=200)
    factories.price("up-*", "1", "2", default_max_output_tokens=100)
    gateway = Gateway(live_server.url + "/v1")
    yield gateway
    gateway.close()


@pytest.fixture
def upstream(settings, quota_prefix):
    """The tests' own upstream server, configured as the gateway's OPENAI_BASE_URL."""
    server = UpstreamServer().start()
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "UPSTREAM": None,
        "OPENAI_BASE_URL": server.url,
        "OPENAI_API_KEY": "sk-gateway-key",
        "UPSTREAM_READ_TIMEOUT": 5.0,
    }
    yield server
    server.stop()


@pytest.fixture
def oracle(settings, quota_prefix):
    """An upstream that bills like OpenAI (``OracleServer``), as the gateway's OPENAI_BASE_URL."""
    server = OracleServer().start()
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "UPSTREAM": None,
        "OPENAI_BASE_URL": server.url,
        "OPENAI_API_KEY": "sk-gateway-key",
        "UPSTREAM_READ_TIMEOUT": 30.0,
    }
    yield server
    server.stop()
