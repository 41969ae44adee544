"""Relay an upstream's SSE stream to the client chunk by chunk, and settle it once.

Nothing is buffered: each upstream event is re-emitted as soon as it is read. The
relay watches what passes through, so that the reservation is settled

- from the upstream's final usage (chat's usage chunk, which the gateway always asks
  for with ``stream_options.include_usage``; Responses' ``response.completed``), or,
  when the upstream sends none, from the text it streamed as counted by
  ``estimation.count_output``;
- when the client disconnects, from what had been generated until then; closing the
  upstream response stops the generation, so nothing is generated, or reserved,
  after that;
- when the upstream drops the connection mid-stream, or ends the stream without its
  last event (cut short, however cleanly the connection closed), from what it had
  sent; the client then gets an ``error`` event instead of the closing one, which the
  OpenAI SDKs raise as ``APIError``, so a cut-off answer never looks whole.

The usage-only final chunk is passed on only to a client that asked for it.

What happens to each event is the API shape's ``Watch`` (``shapes.base``: chat's
``StreamWatch``, the Responses and Messages watches), with no I/O; ``Relay``
(the sync gateway, a generator) and ``AsyncRelay`` (the async gateway, an async
generator) only move the events and settle through the guard's sync or async methods.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator

from asgiref.sync import async_to_sync

from llm_quota.gateway import sse
from llm_quota.gateway.settlement import asettle, settle
from llm_quota.gateway.upstream import AsyncUpstreamStream, UpstreamError, UpstreamStream
from llm_quota.quota.guard import QuotaGuard
from llm_quota.shapes.base import Watch

logger = logging.getLogger("llm_quota")


#: The upstream stopped streaming before its last event.
TRUNCATED = UpstreamError(
    502, "The upstream ended the stream before the answer was complete.", code="upstream_truncated"
)


def failure_event(watch: Watch, exc: UpstreamError) -> bytes:
    """The ``error`` event that ends a stream the upstream broke off, in its API's shape."""
    name, payload = watch.failure(exc.message, exc.code)
    return sse.event(payload, name)


def last_event(watch: Watch, model: str) -> bytes | None:
    """What ends the client's stream once the upstream's stopped: the shape's closing
    payload (chat's ``[DONE]``) after the upstream's own end, nothing after an error it
    sent (already passed on), else an ``error`` event: the stream was cut short."""
    if watch.complete:
        return None if watch.done is None else sse.event(watch.done)
    if watch.ended:
        return None
    logger.warning("upstream stream for %s ended without its last event: cut short", model)
    return failure_event(watch, TRUNCATED)


def event_for(watch: Watch, data: str) -> bytes | None:
    """The event to send the client for one upstream payload, or None to send nothing."""
    payload = watch.feed(data)
    return None if payload is None else sse.event(payload, watch.event_name)


class Relay:
    """The response body of a streamed completion: iterate it, and ``close()`` it.

    Django calls ``close()`` when the response ends, however it ends, even when the
    body was never iterated (the client left before the first byte): so the
    reservation is settled and the upstream connection closed in every case.
    """

    def __init__(self, stream: UpstreamStream, guard: QuotaGuard, watch: Watch):
        self.stream = stream
        self.guard = guard
        self.watch = watch
        self._events = self._relay()

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        try:
            self._events.close()  # GeneratorExit inside, if it was suspended mid-stream
        finally:
            self.stream.close()
            self._settle()

    def _settle(self) -> None:
        settle(self.guard, self.watch.used)

    def _relay(self) -> Generator[bytes, None, None]:
        try:
            for data in self.stream:
                event = event_for(self.watch, data)
                if event is not None:
                    yield event
                if self.watch.ended:
                    break
        except GeneratorExit:
            # The client went away: charge what was generated, give back the rest.
            self._settle()
            raise
        except UpstreamError as exc:
            self._settle()
            logger.warning("upstream stream for %s failed: %s", self.guard.model, exc)
            yield failure_event(self.watch, exc)
            return
        except BaseException:
            self._settle()
            raise
        finally:
            self.stream.close()
        self._settle()
        last = last_event(self.watch, self.guard.model)
        if last is not None:
            yield last


class _Ending:
    """What ends an async relay: close the upstream, then settle, once and shielded.

    Kept apart from the relay, so that a relay dropped without being read or closed
    can still be ended once it is garbage (see ``AsyncRelay``).
    """

    def __init__(self, stream: AsyncUpstreamStream, guard: QuotaGuard, watch: Watch):
        self.stream = stream
        self.guard = guard
        self.watch = watch
        self.future: asyncio.Future[None] | None = None

    @property
    def started(self) -> bool:
        return self.future is not None

    async def run(self) -> None:
        """Run the ending, or await the one already running: never twice. The work is a
        task of its own behind ``asyncio.shield``: cancelling the caller cannot cut it."""
        if self.future is None:
            self.future = asyncio.ensure_future(self._close_and_settle())
        await asyncio.shield(self.future)

    async def _close_and_settle(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            await asettle(self.guard, self.watch.used)


#: Endings of dropped relays, held until they are done (the loop keeps weak references).
_abandoned: set[asyncio.Task[None]] = set()


def _end_abandoned(loop: asyncio.AbstractEventLoop, ending: _Ending) -> None:
    """A relay was garbage-collected without being ended: end it on its loop."""
    if ending.started or loop.is_closed():
        return

    def start() -> None:
        task = loop.create_task(ending.run())
        _abandoned.add(task)
        task.add_done_callback(_abandoned.discard)

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:  # the loop closed meanwhile: the reservation's lease ends it
        pass


class AsyncRelay:
    """``Relay`` for the async gateway: ``async for`` its events; settled exactly once.

    The stream ends one of five ways, and each goes through ``_Ending.run``, which
    closes the upstream and settles once (a second call awaits the first):

    - the upstream finished: from its usage, before the closing event is sent;
    - the upstream failed, or stopped without its last event: from what it sent, then
      an ``error`` event;
    - the client left while the relay awaited the upstream: the ASGI handler cancels
      the request's task, ``CancelledError`` arrives here, and the settle runs in a
      task of its own behind ``asyncio.shield``, so a second cancellation cannot stop
      it half-way;
    - the client left while the relay waited at a ``yield``: nothing is raised here,
      but Django calls ``close()`` once the response is over (under ASGI from a
      thread, so it waits for ``aclose()`` on the loop), as it does when the body was
      never read at all;
    - the client left before Django began sending the response: Django then neither
      reads the body nor calls ``close()``; once the relay is garbage, a finalizer
      ends it on its loop rather than leave it reserved until ``RESERVATION_TTL``.
    """

    def __init__(self, stream: AsyncUpstreamStream, guard: QuotaGuard, watch: Watch) -> None:
        self.stream = stream
        self.guard = guard
        self.watch = watch
        self._ending = _Ending(stream, guard, self.watch)
        self._events = self._relay()
        self._closing: asyncio.Task[None] | None = None
        finalizer = weakref.finalize(self, _end_abandoned, asyncio.get_running_loop(), self._ending)
        # A settable property of finalize; typeshed lists it beside an empty __slots__.
        finalizer.atexit = False  # type: ignore[misc]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        try:
            async for data in self.stream:
                event = event_for(self.watch, data)
                if event is not None:
                    yield event
                if self.watch.ended:
                    break
        except UpstreamError as exc:
            await self._ending.run()
            logger.warning("upstream stream for %s failed: %s", self.guard.model, exc)
            yield failure_event(self.watch, exc)
            return
        except BaseException:
            # CancelledError (the client left), GeneratorExit (aclose), or a bug.
            await self._ending.run()
            raise
        await self._ending.run()
        last = last_event(self.watch, self.guard.model)
        if last is not None:
            yield last

    async def aclose(self) -> None:
        """End the relay wherever it stands: upstream closed, reservation settled."""
        await self._events.aclose()  # GeneratorExit at its yield: it finishes itself
        await self._ending.run()  # or it never started: the client left before the first byte

    def close(self) -> None:
        """Django's hook for the end of a response (``HttpResponse.close``)."""
        if self._ending.future is not None and self._ending.future.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Django's ASGI handler runs response.close() in a thread: wait for the loop.
            async_to_sync(self.aclose)()
            return
        # Called on the loop itself (Django's test AsyncClient): it cannot wait here.
        self._closing = loop.create_task(self.aclose())
