"""An ASGI entry point whose requests keep their thread for sync code, as WSGI threads do.

Django's ``ASGIHandler`` wraps each request in a fresh ``ThreadSensitiveContext``. A
request's first hop to sync code starts a new thread for it, and every ASGI request
makes hops even when its view is async: ``request_started``'s receivers (Django's own
``close_old_connections``), then ``response.close()``. At the request's end another
thread is started to join the first (asgiref 3.13): two thread starts per request
(0.5 ms of CPU in section 10 of the benchmarks).

``ThreadedASGIHandler`` gives each request's context one single-thread executor from a
pool and takes it back at the end. A request in flight still has a thread of its own,
never shared with another request;
it is only kept for a later request, as a gunicorn thread is. So thread-bound state
(database connections) lives as under WSGI, and Django's ``request_started`` and
``request_finished`` receivers manage it the same way. At most ``idle`` executors are
kept; the rest end their thread once done, and so does one that a cancelled request
left running a call.

Django's ``handle`` still hops to that thread twice per request, for the receivers of
``request_started`` and ``request_finished`` (``close_old_connections`` of the thread's
database connections). While those receivers are Django's own and ``handle`` is the
source ``handle_lean`` copies (``HANDLE_SHA256``), a request whose code never goes to its
thread (the async gateway, warm) makes no hop: ``request_started``'s receivers run in the
thread before its first call there, and the response is closed there only if one was
made. A host that connects its own receiver to either signal gets Django's ``handle``.

An opt-in for the host project's ASGI module, like ``warm_up``::

    from llm_quota.gateway.asgi import get_asgi_application
    application = get_asgi_application()

It lends the executor through asgiref's ``SyncToAsync.context_to_thread_executor``
(asgiref 3.x; not a documented API): on an asgiref without it, it is Django's own
handler, and ``tests/integration/gateway/test_asgi_threads.py`` fails.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import inspect
import itertools
import threading
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import django
from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
from django.core import signals
from django.core.cache import close_caches
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import reset_urlconf
from django.db import close_old_connections, reset_queries
from django.dispatch.dispatcher import _make_id  # type: ignore[attr-defined]
from django.http import HttpResponseBase
from django.urls import set_script_prefix

#: Whether this asgiref maps each thread-sensitive context to its executor, where a
#: request's executor can be lent (asgiref 3.x; not a documented API).
POOLABLE = isinstance(getattr(SyncToAsync, "context_to_thread_executor", None), MutableMapping)

#: Idle threads a worker keeps for later requests; beyond them, a thread ends.
IDLE_THREADS = 64

#: sha256 of ``inspect.getsource(ASGIHandler.handle)`` (Django 5.2.19), the method that
#: ``ThreadedASGIHandler.handle_lean`` copies. Another Django's ``handle`` serves its
#: requests instead, and ``test_asgi_lean.py`` fails until the copy is looked at.
HANDLE_SHA256 = "98faeb5bef800331e6a8002fbc96b30e4122a23438ae45a047190a531ea11323"


def handle_digest() -> str | None:
    """The sha256 of this Django's ``ASGIHandler.handle`` source (None if unreadable)."""
    try:
        source = inspect.getsource(ASGIHandler.handle)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()


def _keys(*receivers: Callable[..., Any]) -> frozenset[tuple[int, int]]:
    return frozenset((_make_id(receiver), _make_id(None)) for receiver in receivers)


#: Django's own receivers, which the lean path knows: thread-bound (the thread's
#: database connections) and context-bound (the request's caches, its URLconf).
STARTED_DEFAULTS = _keys(reset_queries, close_old_connections)
FINISHED_DEFAULTS = _keys(reset_urlconf, close_old_connections, close_caches)
#: ``request_finished``'s receivers that act on no thread's state: run on the loop when
#: the request's thread was not used.
FINISHED_ON_LOOP = (reset_urlconf, close_caches)


def defaults_only() -> bool:
    """Whether ``request_started`` and ``request_finished`` have Django's receivers and
    no other (a host's own receiver, a test's ``CaptureQueriesContext``): what the lean
    path may run its own way."""
    for signal, defaults in (
        (signals.request_started, STARTED_DEFAULTS),
        (signals.request_finished, FINISHED_DEFAULTS),
    ):
        keys = [entry[0] for entry in signal.receivers]
        if len(keys) != len(defaults) or frozenset(keys) != defaults:
            return False
    return True


class RequestThread(ThreadPoolExecutor):
    """A single-thread executor that knows whether a call is still queued or running.

    A request cancelled while its sync code runs (the client left during an ORM query)
    leaves that call running: its thread must not be lent to the next request, which
    would wait behind it."""

    def __init__(self, name: str) -> None:
        super().__init__(1, name)
        self.pending = 0
        self.counting = threading.Lock()
        self.calls = 0  # submitted since ``lend``
        self.first: Callable[[], Any] | None = None

    def lend(self, first: Callable[[], Any] | None = None) -> None:
        """Start counting calls for a request; ``first`` runs in this thread before the
        first of them (its ``request_started`` receivers, before its ORM call)."""
        with self.counting:
            self.calls, self.first = 0, first

    def take_back(self) -> int:
        """The calls made since ``lend``; a ``first`` that no call ran is dropped."""
        with self.counting:
            self.first = None
            return self.calls

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self.counting:
            self.pending += 1
            self.calls += 1
            first, self.first = self.first, None
        if first is not None:
            fn = functools.partial(_after, first, fn)
        future = super().submit(fn, *args, **kwargs)
        # Added before asgiref's own callback, so the count is down when the loop resumes.
        future.add_done_callback(self.done)
        return future

    def done(self, future: Future[Any]) -> None:
        with self.counting:
            self.pending -= 1


def _after(first: Callable[[], Any], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    first()  # an error here is the call's, as Django's ``asend`` raises into ``handle``
    return fn(*args, **kwargs)


class ThreadPool:
    """Single-thread executors, each lent to one request at a time."""

    def __init__(self, idle: int = IDLE_THREADS) -> None:
        self.idle = idle
        self.free: list[RequestThread] = []
        self.numbers = itertools.count()

    def new(self) -> RequestThread:
        # A name per thread, for py-spy and logs: "llmq-request-3_0".
        return RequestThread(f"llmq-request-{next(self.numbers)}")

    def take(self) -> RequestThread:
        # Last in, first out: the thread that served the previous request is warm.
        return self.free.pop() if self.free else self.new()

    def give_back(self, executor: RequestThread) -> None:
        if executor.pending == 0 and len(self.free) < self.idle:
            self.free.append(executor)
        else:  # busy with an abandoned call, or one too many idle
            executor.shutdown(wait=False)  # its thread ends after its last call: no join


class ThreadedASGIHandler(ASGIHandler):
    """Django's ``ASGIHandler``, each request's sync code in a pooled thread (above)."""

    def __init__(self, idle: int = IDLE_THREADS) -> None:
        super().__init__()
        self.threads = ThreadPool(idle)
        #: Whether ``handle_lean`` is a copy of this Django's ``handle``.
        self.pinned = handle_digest() == HANDLE_SHA256

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not POOLABLE or scope["type"] != "http":
            await super().__call__(scope, receive, send)  # Django's checks and context
            return
        executor = self.threads.take()
        context = ThreadSensitiveContext()  # Django's, as its __call__ opens it
        try:
            async with context:
                await self.handle_in(context, executor, scope, receive, send)
        finally:
            self.threads.give_back(executor)

    async def handle_in(
        self, context: ThreadSensitiveContext, executor: RequestThread, *args: Any
    ) -> None:
        """``handle``, the context's sync code in ``executor``.

        Not ``ThreadSensitiveContext(executor=...)``: a task that outlives the request
        (a settle shielded from a client that left, its alert's receivers) would get a
        RuntimeError from its next thread-sensitive call. Lent through asgiref's map of
        contexts to executors instead, taken back before the context ends, a late call
        gets a thread of its own, as under Django's handler."""
        lent = context.token is not None  # else an outer context (a test client) rules
        if lent:
            SyncToAsync.context_to_thread_executor[context] = executor
        try:
            if lent and self.pinned and defaults_only():
                await self.handle_lean(executor, *args)
            else:
                await self.handle(*args)
        finally:
            executor.take_back()  # a request that raised leaves no ``first`` to the next
            if lent and SyncToAsync.context_to_thread_executor.get(context) is executor:
                del SyncToAsync.context_to_thread_executor[context]

    async def handle_lean(
        self, executor: RequestThread, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        """Django's ``handle`` (``HANDLE_SHA256``) without its two hops to the request's
        thread when the request has no sync code.

        Django sends ``request_started`` through ``sync_to_async`` and closes the response
        (``request_finished``) through another. Their receivers are Django's own
        (``defaults_only``) and act on the thread's database connections: here
        ``request_started``'s run in the request's thread before its first call there
        (``RequestThread.lend``), and the response is closed there only if a call was
        made. Otherwise it is closed on the loop: its resource closers (a stream's
        iterator) and the receivers that act on no thread (``FINISHED_ON_LOOP``) run,
        not those of an unused thread's connections. Changed lines are marked."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        # Changed: request_started's receivers wait for the request's first sync call.
        executor.lend(
            functools.partial(
                contextvars.copy_context().run,
                signals.request_started.send,
                sender=self.__class__,
                scope=scope,
            )
        )
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None  # create_request returns one or the other
            body_file.close()
            await self.send_response(error_response, send)
            await self.close_response(executor, error_response)  # Changed
            return

        async def process_request(request: Any, send: Any) -> Any:
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # client disconnected during send_response
            return response

        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await self.close_response(executor, None)  # Changed
        else:
            await self.close_response(executor, response)  # Changed

        body_file.close()

    async def close_response(
        self, executor: RequestThread, response: HttpResponseBase | None
    ) -> None:
        """Django's end of a request (``response.close()``, or ``request_finished``
        alone for a cancelled one), in the request's thread if it was used."""
        if executor.take_back():
            if response is None:
                await signals.request_finished.asend(sender=self.__class__)
            else:
                await sync_to_async(response.close)()
            return
        if response is not None:
            closers: list[Callable[[], Any]] = response._resource_closers  # type: ignore[attr-defined]
            for closer in closers:
                try:
                    closer()
                except Exception:
                    pass  # as HttpResponseBase.close
            closers.clear()
            response.closed = True
        for receiver in FINISHED_ON_LOOP:
            receiver(signal=signals.request_finished, sender=self.__class__)


def get_asgi_application(idle: int = IDLE_THREADS) -> ThreadedASGIHandler:
    """``django.core.asgi.get_asgi_application``, served by ``ThreadedASGIHandler``."""
    django.setup(set_prefix=False)
    return ThreadedASGIHandler(idle)
