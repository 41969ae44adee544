"""Fixtures: the live server's gateway, and the tests' own upstreams behind it."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
from django.db import connections

from llm_quota.gateway.asgi import ThreadedASGIHandler
from tests.support import factories
from tests.support.fake_upstream import UpstreamServer
from tests.support.gateway import Gateway
from tests.support.oracle_upstream import OracleServer

ASYNC_URLS = "tests.integration.gateway.async_gateway_urls"


def _prices() -> None:
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=200)
    factories.price("gpt-4o-mini", "0.06", "0.24", default_max_output_tokens=200)
    factories.price("up-*", "1", "2", default_max_output_tokens=100)


@pytest.fixture
def gateway(live_server, quota_prefix):
    """The live server's ``/v1``; prices for the fake provider's and the upstream's models."""
    _prices()
    gateway = Gateway(live_server.url + "/v1")
    yield gateway
    gateway.close()


@pytest.fixture
def async_gateway(transactional_db, quota_prefix, settings, monkeypatch):
    """``gateway`` for the async view: served by uvicorn in a thread of this process, a
    real ASGI server, so a stream goes out event by event as it does in production, on
    the demo's handler (``ThreadedASGIHandler``, its lean path)."""
    _prices()
    settings.ROOT_URLCONF = ASYNC_URLS
    # Each request's ORM work runs in a thread of its own: close its connection at the
    # request's end, or it would outlive the test (and the test database).
    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 0)
    config = uvicorn.Config(
        ThreadedASGIHandler(), host="127.0.0.1", port=0, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    gateway = Gateway(f"http://127.0.0.1:{port}/v1")
    yield gateway
    gateway.close()
    server.should_exit = True
    thread.join(10)


@pytest.fixture(params=["sync", "async"])
def either_gateway(request):
    """The sync view under the live server, then the async view under uvicorn."""
    return request.getfixturevalue("gateway" if request.param == "sync" else "async_gateway")


def _serve(settings, server, read_timeout: float):
    """Start ``server`` and make it the gateway's upstream (OPENAI_BASE_URL)."""
    server.start()
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "UPSTREAM": None,
        "OPENAI_BASE_URL": server.url,
        "OPENAI_API_KEY": "sk-gateway-key",
        "UPSTREAM_READ_TIMEOUT": read_timeout,
    }
    return server


@pytest.fixture
def upstream(settings, quota_prefix):
    """The tests' own upstream server, configured as the gateway's OPENAI_BASE_URL."""
    server = _serve(settings, UpstreamServer(), 5.0)
    yield server
    server.stop()


@pytest.fixture
def oracle(settings, quota_prefix):
    """An upstream that bills like OpenAI (``OracleServer``), as the gateway's OPENAI_BASE_URL."""
    server = _serve(settings, OracleServer(), 30.0)
    yield server
    server.stop()
