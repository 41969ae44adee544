"""The async upstream calls on aiohttp (``gateway.async_http``): the bytes httpx sent,
connections kept alive, every failure an ``UpstreamError`` that the release rule
decides as it decided httpx's (``gateway.call.billed_nothing``), streams closed when the
relay closes them, TLS verified as httpx verifies it; and, through the async view, the
same answers and charges as the sync view's. The sync sender's own tests
(``test_sync_sender``) supply the loopback upstream."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import sys
import time
import warnings

import aiohttp
import httpx
import pytest
from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler

from llm_quota import gateway as gateway_package
from llm_quota.gateway import async_http
from llm_quota.gateway.call import billed_nothing
from llm_quota.gateway.upstream import HttpUpstream, UpstreamError, _client_options
from tests.integration.gateway.test_async_view import (
    ASYNC_URLS,
    _asgi_scope,
    _auth,
    async_post,
    nothing_held,
    sync_post,
)
from tests.integration.gateway.test_sync_sender import (
    BODY,
    Upstream,
    answering,
    chunked,
    make_certificate,
    ok,
    tls_server,
)
from tests.support import factories
from tests.support.gateway import MSGS
from tests.system.test_async_ledger import run_with_orm


def _run(upstream: HttpUpstream, call):
    """``call(upstream)`` on a loop of its own, its session closed as the loop ends."""
    return asyncio.run(call(upstream))


def _client(server: Upstream, read_timeout: float = 5, scheme: str = "http") -> HttpUpstream:
    return HttpUpstream(f"{scheme}://127.0.0.1:{server.port}/v1", "sk-test",
                        connect_timeout=2, read_timeout=read_timeout)  # fmt: skip


async def _complete(upstream: HttpUpstream, times: int = 1, path: str = "chat/completions"):
    return [await upstream.acomplete(BODY, path=path) for _ in range(times)][-1]


async def _events(upstream: HttpUpstream) -> list[str]:
    stream = await upstream.astream(BODY)
    try:
        return [data async for data in stream]
    finally:
        await stream.aclose()


@pytest.fixture
def no_httpx_async(monkeypatch):
    """httpx's async client fails any call: what passes went through aiohttp."""

    async def refused(self, *args, **kwargs):
        raise AssertionError("an async upstream call went through httpx")

    monkeypatch.setattr(httpx.AsyncClient, "send", refused)


# -- the sender, on its own -------------------------------------------------------------


def test_async_calls_go_through_aiohttp_on_one_kept_alive_connection(no_httpx_async):
    server = Upstream(answering(ok()))
    upstream = _client(server)
    try:
        assert isinstance(upstream.async_sender, async_http.AsyncSender)
        assert _run(upstream, lambda u: _complete(u, times=3))["id"] == "c"
        assert server.connections == 1
    finally:
        server.close()


def test_the_request_is_what_httpx_sent():
    server = Upstream(answering(ok()))
    try:
        _run(_client(server), lambda u: _complete(u, path="responses"))
    finally:
        server.close()
    head, _, content = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/responses HTTP/1.1"
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["content-type"] == "application/json"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["user-agent"] == f"python-httpx/{httpx.__version__}"
    with httpx.Client(**_client_options(f"http://127.0.0.1:{server.port}/v1", "k", 1, 1)) as c:
        sent = c.build_request("POST", "responses", json=BODY)
    assert content == sent.read()  # byte for byte, UTF-8 unescaped


def test_a_refused_connection_is_502_and_billed_nothing():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    upstream = HttpUpstream(f"http://127.0.0.1:{port}/v1", None, connect_timeout=2, read_timeout=2)
    with pytest.raises(UpstreamError) as raised:
        _run(upstream, _complete)
    assert raised.value.status == 502 and raised.value.code == "upstream_unreachable"
    assert isinstance(raised.value.__cause__, aiohttp.ClientConnectorError)
    assert billed_nothing(raised.value)


def test_an_answer_that_never_comes_is_504_and_charged():
    def silent(conn: socket.socket, request: bytes) -> bool:
        time.sleep(1)
        return False

    server = Upstream(silent)
    try:
        with pytest.raises(UpstreamError) as raised:
            _run(_client(server, read_timeout=0.2), _complete)
    finally:
        server.close()
    assert raised.value.status == 504 and raised.value.code == "upstream_timeout"
    assert isinstance(raised.value.__cause__, aiohttp.SocketTimeoutError)
    assert not billed_nothing(raised.value)


@pytest.mark.parametrize("status", [429, 500])
def test_an_error_answer_is_passed_on_with_its_body_and_its_connection_kept(status):
    error = json.dumps({"error": {"message": "slow down", "type": "rate"}}).encode()
    answer = ok(error).replace(b"200 OK", f"{status} Nope".encode(), 1)
    answer = answer.replace(b"\r\n\r\n", b"\r\nRetry-After: 7\r\n\r\n", 1)
    server = Upstream(answering(answer))

    async def twice(upstream: HttpUpstream) -> list[UpstreamError]:
        errors = []
        for call in (_complete, _events):
            try:
                await call(upstream)
            except UpstreamError as exc:
                errors.append(exc)
        return errors

    try:
        errors = _run(_client(server), twice)
        assert server.connections == 1
    finally:
        server.close()
    assert len(errors) == 2
    for error in errors:
        assert error.status == status and error.message == "slow down"
        assert error.error == {"message": "slow down", "type": "rate"}
        assert error.headers["retry-after"] == "7"
        assert billed_nothing(error)


def test_a_stream_is_read_line_by_line_and_its_connection_kept():
    big = "x" * 300_000  # one line past aiohttp's own readline limit (128 KiB)
    events = chunked(b'data: {"a": 1}\r\n\r\ndata: {"b"', b": 2}\n\n", b"data: " + big.encode(),
                     b"\n\ndata: [DONE]\n\n", b"")  # fmt: skip
    server = Upstream(answering(events))

    async def twice(upstream: HttpUpstream) -> list[list[str]]:
        return [await _events(upstream), await _events(upstream)]

    try:
        read = _run(_client(server), twice)
        assert server.connections == 1
    finally:
        server.close()
    assert read == [['{"a": 1}', '{"b": 2}', big, "[DONE]"]] * 2


def test_a_stream_dropped_midway_raises_as_dropped_after_what_arrived():
    def drop(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(chunked(b'data: {"a": 1}\n\n'))
        time.sleep(0.05)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        return False  # closed with a reset, mid-body

    async def read(upstream: HttpUpstream) -> tuple[list[str], UpstreamError]:
        stream, got = await upstream.astream(BODY), []
        try:
            async for data in stream:
                got.append(data)
        except UpstreamError as exc:
            return got, exc
        finally:
            await stream.aclose()
        raise AssertionError("the stream ended cleanly")

    server = Upstream(drop)
    try:
        got, error = _run(_client(server), read)
    finally:
        server.close()
    assert got == ['{"a": 1}']
    assert error.code == "upstream_dropped" and not billed_nothing(error)


def test_a_stream_that_stops_sending_is_504_and_charged():
    def stall(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(chunked(b'data: {"a": 1}\n\n'))
        time.sleep(1)
        return False

    async def read(upstream: HttpUpstream) -> UpstreamError:
        stream = await upstream.astream(BODY)
        try:
            async for _data in stream:
                pass
        except UpstreamError as exc:
            return exc
        finally:
            await stream.aclose()
        raise AssertionError("the stream ended cleanly")

    server = Upstream(stall)
    try:
        error = _run(_client(server, read_timeout=0.2), read)
    finally:
        server.close()
    assert error.status == 504 and error.code == "upstream_timeout"
    assert not billed_nothing(error)


def test_a_stream_closed_before_its_end_closes_the_connection():
    """So the upstream stops generating, as it did when httpx closed the response."""

    def endless(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(chunked(b'data: {"a": 1}\n\n'))
        return True  # never ends the body; waits for the next request, or the close

    async def first(upstream: HttpUpstream) -> str:
        stream = await upstream.astream(BODY)
        reader = stream.__aiter__()
        try:
            return await reader.__anext__()
        finally:
            await reader.aclose()
            await stream.aclose()
            assert await asyncio.to_thread(server.closed_by_client.wait, 2)

    server = Upstream(endless)
    try:
        assert _run(_client(server), first) == '{"a": 1}'
    finally:
        server.close()


def test_the_loops_session_is_closed_with_the_loop_without_a_warning():
    server = Upstream(answering(ok()))
    upstream = _client(server)
    gc.collect()  # what earlier tests left behind warns now, not in the block below
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(upstream, _complete)
            _run(upstream, _complete)  # a second loop: a session of its own
            gc.collect()
        assert upstream.async_sender._sessions == {}
        assert server.connections == 2
        # aiohttp's own (a Redis connection an earlier test left may be collected here)
        unclosed = [str(w.message) for w in caught if "nclosed c" in str(w.message)]
        assert not unclosed  # "Unclosed client session", "Unclosed connector"
    finally:
        server.close()


def test_without_aiohttp_the_async_calls_keep_httpx(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # ``import aiohttp`` fails
    monkeypatch.delitem(sys.modules, "llm_quota.gateway.async_http")
    monkeypatch.delattr(gateway_package, "async_http")
    sent = []
    real = httpx.AsyncClient.send

    async def counted(self, *args, **kwargs):
        sent.append(args[0].url.path)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", counted)
    server = Upstream(answering(ok()))
    upstream = _client(server)

    async def call(upstream: HttpUpstream):
        try:
            return await _complete(upstream)
        finally:
            await (await upstream.aclient()).aclose()

    try:
        assert upstream.async_sender is None
        assert _run(upstream, call)["id"] == "c"
    finally:
        server.close()
    assert sent == ["/v1/chat/completions"]


def test_a_proxy_in_the_environment_keeps_httpx(monkeypatch):
    """httpx sends through ``HTTPS_PROXY`` and the like; the sender would not."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    upstream = HttpUpstream("https://api.example/v1", None, connect_timeout=1, read_timeout=1)
    assert upstream.async_sender is None


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1, and its key (``test_sync_sender``)."""
    return make_certificate(tmp_path)


@pytest.fixture
def fresh_tls(monkeypatch):
    """The process's TLS context, made again with this test's environment."""
    monkeypatch.setattr(async_http, "_ssl_context", None)


def test_an_https_upstream_is_verified_as_httpx_verifies_it(certificate, monkeypatch, fresh_tls):
    """``SSL_CERT_FILE`` names the CA bundle, the host is checked; kept alive."""
    server = tls_server(certificate)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    try:
        assert _run(_client(server, scheme="https"), lambda u: _complete(u, 2))["id"] == "c"
        assert server.connections == 1
    finally:
        server.close()


def test_an_untrusted_certificate_is_502_and_billed_nothing(certificate, fresh_tls):
    server = tls_server(certificate)
    try:
        with pytest.raises(UpstreamError) as raised:
            _run(_client(server, scheme="https"), _complete)
    finally:
        server.close()
    assert raised.value.status == 502 and raised.value.code == "upstream_unreachable"
    assert isinstance(raised.value.__cause__, aiohttp.ClientConnectorCertificateError)
    assert billed_nothing(raised.value)


# -- through the async view: the ledger's side ------------------------------------------

pytest_django_db = pytest.mark.django_db(transaction=True)
STREAM = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 20, "stream": True}


def _chat(text: str) -> bytes:
    data = json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})
    return f"data: {data}\n\n".encode()


def _answers(name: str):
    """The loopback upstream's answer for each test below, by name."""
    error = json.dumps({"error": {"message": "overloaded", "type": "server"}}).encode()

    def stall(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(chunked(_chat("hello"), _chat(" world")).removesuffix(b"0\r\n\r\n"))
        time.sleep(1)
        return False

    def endless(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(chunked(_chat("hello"), _chat(" world")).removesuffix(b"0\r\n\r\n"))
        return True  # the body never ends: the upstream waits for the gateway's close

    return {
        "ok": answering(ok()),
        "refused": answering(ok()),
        "429": answering(ok(error).replace(b"200 OK", b"429 Too Many", 1)),
        "500": answering(ok(error).replace(b"200 OK", b"500 Internal", 1)),
        "stall": stall,
        "endless": endless,
    }[name]


@pytest.fixture
def served(request, settings, quota_prefix):
    """A loopback upstream answering as ``request.param`` names, the gateway's upstream
    (set before ``ledger``: a settings change drops the project's ledger)."""
    server = Upstream(_answers(request.param))
    server.name = request.param
    port = server.port
    if request.param == "refused":  # a port nothing listens on
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "UPSTREAM": None,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "OPENAI_API_KEY": "sk-test",
        "UPSTREAM_READ_TIMEOUT": 0.3 if request.param == "stall" else 5,
    }
    yield server
    server.close()


@pytest.fixture
def priced(served, ledger):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=200)
    factories.tier("free", is_default=True, requests_per_minute=50)


@pytest_django_db
@pytest.mark.parametrize("served", ["ok"], indirect=True)
def test_the_async_view_calls_the_upstream_through_aiohttp(served, priced, ledger, no_httpx_async):
    user = factories.user()
    response = async_post(BODY | {"model": "gpt-4o"}, _auth(user))
    assert response.status_code == 200, response.body
    assert json.loads(response.body)["id"] == "c"
    nothing_held(ledger, user)
    assert ledger.usage(user.pk).tokens_this_month > 0


@pytest_django_db
@pytest.mark.parametrize("served", ["429", "500"], indirect=True)
def test_the_providers_error_is_passed_on_with_its_body_and_released(served, priced, ledger):
    for stream in (False, True):
        user = factories.user()
        response = async_post(BODY | {"model": "gpt-4o", "stream": stream}, _auth(user))
        assert response.status_code == int(served.name)
        assert json.loads(response.body)["error"]["message"] == "overloaded"
        live = ledger.usage(user.pk)
        assert live.tokens_this_month == 0 and live.reserved == 0 and live.in_flight == 0


@pytest_django_db
@pytest.mark.parametrize("served", ["refused"], indirect=True)
def test_a_refused_connection_releases_through_the_async_view(served, priced, ledger):
    user = factories.user()
    response = async_post(BODY | {"model": "gpt-4o"}, _auth(user))
    assert response.status_code == 502
    assert json.loads(response.body)["error"]["code"] == "upstream_unreachable"
    live = ledger.usage(user.pk)
    assert live.tokens_this_month == 0 and live.reserved == 0 and live.in_flight == 0


@pytest_django_db
@pytest.mark.parametrize("served", ["stall"], indirect=True)
def test_a_read_timeout_mid_stream_is_charged_as_the_sync_view_charges_it(served, priced, ledger):
    by_sync, by_async = factories.user(), factories.user()
    sync, async_ = sync_post(STREAM, _auth(by_sync)), async_post(STREAM, _auth(by_async))
    assert async_.status_code == sync.status_code == 200
    assert b"upstream_timeout" in async_.body and b"upstream_timeout" in sync.body
    charged = [ledger.usage(u.pk).tokens_this_month for u in (by_sync, by_async)]
    assert charged[1] == charged[0] > 0
    nothing_held(ledger, by_async)


@pytest_django_db
@pytest.mark.parametrize("served", ["endless"], indirect=True)
def test_a_client_leaving_mid_stream_closes_the_upstream_response(served, priced, ledger, settings):
    """The client's ``http.disconnect`` cancels the relay while it awaits the upstream:
    the upstream's connection is closed (so it stops generating) and the call settled."""
    settings.ROOT_URLCONF = ASYNC_URLS
    user = factories.user()
    body = json.dumps({**STREAM, "max_tokens": 50}).encode()
    scope = _asgi_scope(_auth(user), body)

    async def main():
        client = ApplicationCommunicator(ASGIHandler(), scope)
        await client.send_input({"type": "http.request", "body": body})
        start = await client.receive_output(10)
        assert start["type"] == "http.response.start" and start["status"] == 200
        received = 0
        while received < 2:
            received += (await client.receive_output(10)).get("body", b"").count(b"data: ")
        await client.send_input({"type": "http.disconnect"})
        await client.wait(10)

    run_with_orm(main)
    assert served.closed_by_client.wait(5)
    nothing_held(ledger, user)
    assert ledger.usage(user.pk).tokens_this_month > 0
