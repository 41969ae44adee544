"""``gateway.asgi.ThreadedASGIHandler``: each request's sync code in a thread of its own
while it is in flight, the thread kept for later requests (Django's handler starts one,
and another to join it, per request), and the database connections that thread opened
closed at the request's end as under WSGI."""

from __future__ import annotations

import asyncio
import functools
import json
import threading

import pytest
from asgiref.sync import AsyncToSync, SyncToAsync, sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler
from django.db import connections
from django.http import JsonResponse
from django.urls import path

from llm_quota.gateway.asgi import (
    POOLABLE,
    ThreadedASGIHandler,
    ThreadPool,
)

pytestmark = pytest.mark.urls(__name__)


class Rendezvous:
    """Holds each request until ``expected`` of them are in flight at once."""

    def __init__(self) -> None:
        self.expected, self.arrived, self.all_in = 1, 0, asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_in.set()
        await self.all_in.wait()


rendezvous = Rendezvous()


async def thread_of_sync_code(request):
    await rendezvous.wait()
    name = await sync_to_async(lambda: threading.current_thread().name)()
    return JsonResponse({"thread": name})


def query_then_thread(request):
    """A sync view: reads the database in the request's thread, says which it was."""
    from django.contrib.auth import get_user_model

    get_user_model().objects.exists()
    return JsonResponse({"thread": threading.current_thread().name})


late_work: list[asyncio.Task] = []


async def leaves_work_behind(request):
    """Starts a task that runs sync code after the response (a shielded settle does)."""

    async def later():
        await asyncio.sleep(0.05)
        return await sync_to_async(lambda: threading.current_thread().name)()

    late_work.append(asyncio.ensure_future(later()))
    return JsonResponse({"thread": None})


async def no_sync_code(request):
    return JsonResponse({"thread": None})


urlpatterns = [
    path("async", no_sync_code),
    path("late", leaves_work_behind),
    path("thread", thread_of_sync_code),
    path("query", query_then_thread),
]


def _scope(url: str) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": url, "raw_path": url.encode(), "root_path": "",
        "query_string": b"", "headers": [], "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }  # fmt: skip


async def _get(app, url: str = "/thread") -> str:
    client = ApplicationCommunicator(app, _scope(url))
    await client.send_input({"type": "http.request", "body": b""})
    start = await client.receive_output(10)
    assert start["status"] == 200, start
    body = await client.receive_output(10)
    await client.wait(10)
    return json.loads(body["body"])["thread"]


DJANGOS_SEVEN = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]


def _hops(settings, monkeypatch, middleware: list[str]) -> int:
    """Switches between the loop and the request's thread (``sync_to_async`` one way,
    ``async_to_sync`` the other) while serving one async view."""
    settings.MIDDLEWARE = [*middleware, "llm_quota.middleware.LLMQuotaMiddleware"]
    app, calls = ThreadedASGIHandler(), []
    for bridge in (SyncToAsync, AsyncToSync):
        monkeypatch.setattr(bridge, "__call__", _counted(bridge.__call__, calls))
    asyncio.run(_get(app, "/async"))
    return len(calls)


def _counted(call, calls: list):
    @functools.wraps(call)
    def counted(self, *args, **kwargs):
        calls.append(self)
        return call(self, *args, **kwargs)

    return counted


def _threads_of(app, at_once: int, rounds: int = 2) -> list[list[str]]:
    """Per round, the threads that ``at_once`` requests in flight together ran in."""

    async def main():
        names = []
        for _ in range(rounds):
            rendezvous.__init__()
            rendezvous.expected = at_once
            names.append(await asyncio.gather(*(_get(app) for _ in range(at_once))))
        return names

    return asyncio.run(main())


def test_later_requests_run_their_sync_code_in_a_thread_kept_from_earlier_ones():
    pooled = _threads_of(ThreadedASGIHandler(), at_once=1, rounds=3)
    assert pooled[0] == pooled[1] == pooled[2]
    # Django's own handler: a new thread for each request (what this handler saves).
    fresh = _threads_of(ASGIHandler(), at_once=1, rounds=3)
    assert len({names[0] for names in fresh}) == 3


def test_requests_in_flight_at_once_never_share_a_thread():
    rounds = _threads_of(ThreadedASGIHandler(), at_once=4, rounds=2)
    assert all(len(set(names)) == 4 for names in rounds)
    assert set(rounds[0]) == set(rounds[1])  # the same four, kept


def test_llm_quota_middleware_adds_no_switch_to_a_thread_under_asgi(settings, monkeypatch):
    """None with ``LLMQuotaMiddleware`` alone (Django's own two, ``request_started``'s
    receivers and ``response.close()``, are the lean path's: ``test_asgi_lean.py``);
    each of Django's seven ``MiddlewareMixin`` middleware hops for each of its hooks
    (15 switches on 5.2)."""
    assert _hops(settings, monkeypatch, []) == 0
    assert _hops(settings, monkeypatch, DJANGOS_SEVEN) >= 14


def test_idle_threads_beyond_the_bound_end():
    pool = ThreadPool(idle=1)
    lent = [pool.take() for _ in range(3)]
    threads = [executor.submit(threading.current_thread) for executor in lent]
    threads = [future.result(5) for future in threads]
    for executor in lent:
        pool.give_back(executor)
    assert pool.free == [lent[0]]
    for thread in threads[1:]:
        thread.join(5)
        assert not thread.is_alive()
    assert threads[0].is_alive()
    lent[0].shutdown()


def test_asgiref_still_maps_contexts_to_executors():
    assert POOLABLE  # else the handler is Django's, and nothing here is kept


def test_a_task_that_outlives_its_request_still_runs_sync_code_in_a_thread_of_its_own(
    settings,
):
    """A settle shielded from a client that left runs on after the request: its sync
    calls get a thread (as under Django's handler), never a RuntimeError, and never the
    pooled thread another request may be using by then."""
    settings.MIDDLEWARE = [*DJANGOS_SEVEN, "llm_quota.middleware.LLMQuotaMiddleware"]
    app = ThreadedASGIHandler()

    async def main():
        late_work.clear()
        await _get(app, "/late")
        (request_thread,) = app.threads.free
        return await late_work[0], request_thread

    thread, request_thread = asyncio.run(main())
    assert thread and not thread.startswith("llmq-request-")
    request_thread.shutdown()


def test_a_thread_still_running_an_abandoned_call_is_not_lent_again():
    """A request cancelled while its sync code ran (the client left) leaves the call
    running: the next request gets another thread rather than waiting behind it."""
    pool, release = ThreadPool(), threading.Event()
    busy = pool.take()
    busy.submit(release.wait, 5)
    pool.give_back(busy)
    assert pool.free == [] and pool.take() is not busy
    release.set()
    busy.shutdown()
    idle = pool.take()
    idle.submit(lambda: None).result(5)
    pool.give_back(idle)
    assert pool.free == [idle]
    idle.shutdown()


@pytest.mark.django_db(transaction=True)
def test_a_connection_the_request_opened_is_closed_at_its_end_though_its_thread_lives_on(
    monkeypatch,
):
    """Django's ``request_finished`` receiver (``close_old_connections``) runs in the
    request's thread: with ``CONN_MAX_AGE = 0`` the connection is not left open there."""
    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 0)
    app = ThreadedASGIHandler()

    async def main():
        thread = await _get(app, "/query")
        (executor,) = app.threads.free
        left_open = await asyncio.wrap_future(
            executor.submit(lambda: connections["default"].connection is not None)
        )
        return thread, left_open

    thread, left_open = asyncio.run(main())
    assert thread.startswith("llmq-request-") and not left_open
