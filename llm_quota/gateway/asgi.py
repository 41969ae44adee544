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

An opt-in for the host project's ASGI module, like ``warm_up``::

    from llm_quota.gateway.asgi import get_asgi_application
    application = get_asgi_application()

It lends the executor through asgiref's ``SyncToAsync.context_to_thread_executor``
(asgiref 3.x; not a documented API): on an asgiref without it, it is Django's own
handler, and ``tests/integration/gateway/test_asgi_threads.py`` fails.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import django
from asgiref.sync import SyncToAsync, ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler

#: Whether this asgiref maps each thread-sensitive context to its executor, where a
#: request's executor can be lent (asgiref 3.x; not a documented API).
POOLABLE = isinstance(getattr(SyncToAsync, "context_to_thread_executor", None), MutableMapping)

#: Idle threads a worker keeps for later requests; beyond them, a thread ends.
IDLE_THREADS = 64


class RequestThread(ThreadPoolExecutor):
    """A single-thread executor that knows whether a call is still queued or running.

    A request cancelled while its sync code runs (the client left during an ORM query)
    leaves that call running: its thread must not be lent to the next request, which
    would wait behind it."""

    def __init__(self, name: str) -> None:
        super().__init__(1, name)
        self.pending = 0
        self.counting = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self.counting:
            self.pending += 1
        future = super().submit(fn, *args, **kwargs)
        # Added before asgiref's own callback, so the count is down when the loop resumes.
        future.add_done_callback(self.done)
        return future

    def done(self, future: Future[Any]) -> None:
        with self.counting:
            self.pending -= 1


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
            await self.handle(*args)
        finally:
            if lent and SyncToAsync.context_to_thread_executor.get(context) is executor:
                del SyncToAsync.context_to_thread_executor[context]


def get_asgi_application(idle: int = IDLE_THREADS) -> ThreadedASGIHandler:
    """``django.core.asgi.get_asgi_application``, served by ``ThreadedASGIHandler``."""
    django.setup(set_prefix=False)
    return ThreadedASGIHandler(idle)
