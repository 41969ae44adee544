"""``ThreadedASGIHandler.handle_lean``: Django's ``handle`` without its two hops to the
request's thread when the request has no sync code, and with what those hops were for
(``request_started``'s and ``request_finished``'s receivers on the thread's database
connections) kept for a request that has."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.contrib.auth import get_user_model
from django.core.signals import request_finished, request_started
from django.db import connections
from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path

from llm_quota.gateway import asgi
from llm_quota.gateway.asgi import RequestThread, ThreadedASGIHandler, handle_digest
from tests.support import factories
from tests.support.gateway import MSGS

pytestmark = pytest.mark.urls(__name__)

MARK = {"sql": "-- left by an earlier request", "time": "0"}
seen: dict[str, object] = {}
release = threading.Event()


async def no_sync_code(request):
    return JsonResponse({"ok": True})


async def two_sync_calls(request):
    """The ORM in the request's thread twice: what ``request_started``'s receivers
    (``reset_queries``) left of the thread's query log before each call."""

    def first():
        log = connections["default"].queries_log
        cleared = MARK not in log
        log.append(MARK)  # the second call sees it unless the receivers ran again
        get_user_model().objects.exists()
        return threading.current_thread().name, cleared

    def second():
        return threading.current_thread().name, MARK in connections["default"].queries_log

    seen["first"] = await sync_to_async(first)()
    seen["second"] = await sync_to_async(second)()
    return JsonResponse({"ok": True})


async def raises(request):
    raise RuntimeError("the view failed")


async def queries_then_raises(request):
    await sync_to_async(get_user_model().objects.exists)()
    raise RuntimeError("the view failed after its query")


async def waits_on_the_loop(request):
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        seen["cancelled"] = True
        raise


async def waits_in_its_thread(request):
    def query_then_wait():
        get_user_model().objects.exists()
        seen["thread"] = threading.current_thread().name
        release.wait(10)

    await sync_to_async(query_then_wait)()
    return JsonResponse({"ok": True})


class Chunks:
    """A stream's content with a ``close`` (Django's response closes it at the end)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self):
        return iter(self.chunks)

    def close(self) -> None:
        seen["closed in"] = threading.current_thread().name


class AsyncChunks(Chunks):
    __iter__ = None  # type: ignore[assignment]

    async def _aiter(self):
        for chunk in self.chunks:
            yield chunk

    def __aiter__(self):
        return self._aiter()


async def streams(request):
    chunks = AsyncChunks if request.GET.get("iterator") == "async" else Chunks
    return StreamingHttpResponse(chunks([b"a", b"b"]))


urlpatterns = [
    path("async", no_sync_code),
    path("twice", two_sync_calls),
    path("raises", raises),
    path("queries-then-raises", queries_then_raises),
    path("waits", waits_on_the_loop),
    path("waits-in-thread", waits_in_its_thread),
    path("stream", streams),
]


@pytest.fixture
def submits(monkeypatch, settings):
    """Calls submitted to a request's thread (``RequestThread.submit``), counted."""
    settings.MIDDLEWARE = ["llm_quota.middleware.LLMQuotaMiddleware"]
    seen.clear()
    calls: list[object] = []
    submit = RequestThread.submit

    @functools.wraps(submit)
    def counted(self, fn, /, *args, **kwargs):
        calls.append(fn)
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(RequestThread, "submit", counted)
    return calls


def _closes_response(fn: object) -> bool:
    """Whether a submitted call is ``sync_to_async(response.close)``'s."""
    args = getattr(fn, "args", ())
    return any(getattr(getattr(a, "func", None), "__name__", "") == "close" for a in args)


def _scope(url: str) -> dict:
    url, _, query = url.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": url, "raw_path": url.encode(), "root_path": "",
        "query_string": query.encode(), "headers": [], "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }  # fmt: skip


async def _get(app, url: str) -> tuple[int, bytes]:
    client = ApplicationCommunicator(app, _scope(url))
    await client.send_input({"type": "http.request", "body": b""})
    start = await client.receive_output(10)
    body = b""
    while True:
        message = await client.receive_output(10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await client.wait(10)
    return start["status"], body


def _serve(app, url: str) -> tuple[int, bytes]:
    return asyncio.run(_get(app, url))


def test_the_copied_handle_is_this_djangos():
    """Fails after a Django upgrade that changed ``ASGIHandler.handle``: compare
    ``handle_lean`` with the new ``handle``, then pin the new digest."""
    assert handle_digest() == asgi.HANDLE_SHA256, "ASGIHandler.handle changed: see handle_lean"


def test_a_request_with_no_sync_code_makes_no_call_to_its_thread(submits):
    assert _serve(ThreadedASGIHandler(), "/async")[0] == 200
    assert submits == []


def test_request_starteds_receivers_run_once_in_the_requests_thread_before_its_orm_call(
    submits, transactional_db, monkeypatch
):
    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 0)
    app = ThreadedASGIHandler()
    assert _serve(app, "/async")[0] == 200
    (executor,) = app.threads.free
    # What a previous request left in this thread's query log (Django clears it).
    executor.submit(lambda: connections["default"].queries_log.append(MARK)).result(5)
    submits.clear()
    assert _serve(app, "/twice")[0] == 200
    thread, cleared = seen["first"]
    assert thread.startswith("llmq-request-") and cleared
    assert seen["second"] == (thread, True)  # not run again before the second call
    assert len(submits) == 3  # the two calls, then the response's close: no other hop
    left_open = executor.submit(lambda: connections["default"].connection is not None)
    assert not left_open.result(5)  # CONN_MAX_AGE = 0: closed at the end, in its thread


@pytest.mark.parametrize("signal", [request_started, request_finished])
def test_a_hosts_own_receiver_gets_djangos_handle(submits, signal):
    threads: list[str] = []

    def receiver(**kwargs):
        threads.append(threading.current_thread().name)

    signal.connect(receiver)
    try:
        assert _serve(ThreadedASGIHandler(), "/async")[0] == 200
    finally:
        signal.disconnect(receiver)
    assert len(threads) == 1 and threads[0].startswith("llmq-request-")
    assert len(submits) == 2  # Django's two hops, as Django makes them
    submits.clear()
    assert _serve(ThreadedASGIHandler(), "/async")[0] == 200
    assert submits == []  # disconnected: lean again


def test_a_handle_that_is_not_the_pinned_one_is_djangos(submits, monkeypatch):
    monkeypatch.setattr(asgi, "HANDLE_SHA256", "0" * 64)
    assert _serve(ThreadedASGIHandler(), "/async")[0] == 200
    assert len(submits) == 2


def test_a_stream_with_no_sync_code_is_closed_on_the_loop(submits):
    assert _serve(ThreadedASGIHandler(), "/stream?iterator=async") == (200, b"ab")
    assert submits == []
    assert seen["closed in"] == threading.current_thread().name  # its closer ran


def test_a_stream_read_in_the_requests_thread_is_closed_there(submits):
    assert _serve(ThreadedASGIHandler(), "/stream?iterator=sync") == (200, b"ab")
    assert str(seen["closed in"]).startswith("llmq-request-")
    assert len(submits) == 2  # the iterator read, then the close


def test_an_exception_in_the_view_is_a_500_closed_in_its_thread(submits):
    assert _serve(ThreadedASGIHandler(), "/raises")[0] == 500
    # Django asks the middleware's ``process_exception`` in the request's thread
    # (``process_exception_by_middleware`` through ``sync_to_async``), so the response
    # is closed there too, as Django closes it.
    assert len(submits) == 2


def test_an_exception_after_a_query_still_closes_the_connection_in_its_thread(
    submits, transactional_db, monkeypatch
):
    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 0)
    app = ThreadedASGIHandler()
    assert _serve(app, "/queries-then-raises")[0] == 500
    (executor,) = app.threads.free
    left_open = executor.submit(lambda: connections["default"].connection is not None)
    assert not left_open.result(5)


def test_a_client_that_leaves_mid_request_ends_it_without_a_hop(submits):
    async def main():
        client = ApplicationCommunicator(ThreadedASGIHandler(), _scope("/waits"))
        await client.send_input({"type": "http.request", "body": b""})
        await asyncio.sleep(0.1)
        await client.send_input({"type": "http.disconnect"})
        await client.wait(5)

    asyncio.run(main())
    assert seen["cancelled"] and submits == []


def test_a_cancelled_request_whose_thread_call_runs_on_is_finished_after_it_there(
    submits, transactional_db, monkeypatch
):
    """The client leaves while the request's ORM call runs: ``request_finished`` waits
    for the call, in the same thread, and closes the connection the call opened."""
    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 0)
    release.clear()
    app = ThreadedASGIHandler()

    async def main():
        client = ApplicationCommunicator(app, _scope("/waits-in-thread"))
        await client.send_input({"type": "http.request", "body": b""})
        while "thread" not in seen:
            await asyncio.sleep(0.01)
        await client.send_input({"type": "http.disconnect"})
        await asyncio.sleep(0.2)
        finished_early = client.future.done()
        release.set()
        await client.wait(5)
        return finished_early

    assert not asyncio.run(main())
    (executor,) = app.threads.free
    assert executor._threads and {t.name for t in executor._threads} == {seen["thread"]}
    left_open = executor.submit(lambda: connections["default"].connection is not None)
    assert not left_open.result(5)


@pytest.mark.usefixtures("transactional_db")
def test_a_warm_gateway_request_makes_no_call_to_its_thread(
    submits, async_gateway, upstream, ledger
):
    """The async gateway with its caches warm (JWT user, tier, price) and only
    ``LLMQuotaMiddleware`` (``project.gateway_settings``): no hop at all."""
    factories.tier("free", is_default=True, requests_per_minute=50)
    client = async_gateway.client(factories.user())
    body = {"model": "up-normal", "messages": MSGS, "max_tokens": 20}
    client.chat.completions.create(**body)  # cold: the ORM, in the request's thread
    assert submits
    # The client has its answer before the server has closed the response (in the
    # request's thread, since the ORM ran there): wait for that last hop, or it would
    # be counted against the warm request.
    deadline = time.monotonic() + 5
    while not any(_closes_response(fn) for fn in submits) and time.monotonic() < deadline:
        time.sleep(0.01)
    submits.clear()
    answer = client.chat.completions.create(**body)
    assert answer.usage.total_tokens > 0
    assert submits == []
