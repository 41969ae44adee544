"""Relay an upstream's SSE stream to the client chunk by chunk, and settle it once.

Nothing is buffered: each upstream event is re-emitted as soon as it is read. The
relay watches what passes through, so that the reservation is settled

- from the upstream's final usage chunk (the gateway always asks for one with
  ``stream_options.include_usage``), or, when the upstream sends none, from the text
  it streamed as counted by ``estimation.count_output``;
- when the client disconnects (the server closes the generator: ``GeneratorExit``),
  from what had been generated until then; closing the upstream response stops
  the generation, so nothing is generated, or reserved, after that;
- when the upstream drops the connection mid-stream, from what it had sent; the
  client then gets an ``error`` event, which the OpenAI SDKs raise as ``APIError``.

The usage-only final chunk is passed on only to a client that asked for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from llm_quota import sse
from llm_quota.guard import QuotaGuard
from llm_quota.openai_errors import error_body
from llm_quota.output_text import StreamedOutput
from llm_quota.upstream import UpstreamError, UpstreamStream

logger = logging.getLogger("llm_quota")


def _for_client(data: str, chunk: dict[str, Any], include_usage: bool) -> str | None:
    """The event's data as the client should see it, or None to drop it."""
    if include_usage or "usage" not in chunk:
        return data
    if not chunk.get("choices") and chunk.get("usage"):
        return None  # the usage chunk the gateway asked for, not the client
    trimmed = {key: value for key, value in chunk.items() if key != "usage"}
    return json.dumps(trimmed, separators=(",", ":"))


class Relay:
    """The response body of a streamed completion: iterate it, and ``close()`` it.

    Django calls ``close()`` when the response ends, however it ends, even when the
    body was never iterated (the client left before the first byte): so the
    reservation is settled and the upstream connection closed in every case.
    """

    def __init__(self, stream: UpstreamStream, guard: QuotaGuard, *, include_usage: bool):
        self.stream = stream
        self.guard = guard
        self.include_usage = include_usage
        self.usage: Any = None
        self.output = StreamedOutput()
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
        if self.guard.finished:
            return
        usage = self.usage
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.guard.settle(usage)
        else:
            self.guard.settle_output(self.output.text)

    def _relay(self) -> Iterator[bytes]:
        try:
            for data in self.stream:
                if data.strip() == sse.DONE:
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    chunk = None
                if not isinstance(chunk, dict):
                    yield sse.event(data)  # not ours to judge: pass it on untouched
                    continue
                if chunk.get("error"):
                    # The upstream reported a failure inside the stream; it ends here.
                    yield sse.event(data)
                    break
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                self.output.add(chunk)
                shown = _for_client(data, chunk, self.include_usage)
                if shown is not None:
                    yield sse.event(shown)
        except GeneratorExit:
            # The client went away: charge what was generated, give back the rest.
            self._settle()
            raise
        except UpstreamError as exc:
            self._settle()
            logger.warning("upstream stream for %s failed: %s", self.guard.model, exc)
            yield sse.event(error_body(exc.message, type="upstream_error", code=exc.code))
            return
        except BaseException:
            self._settle()
            raise
        finally:
            self.stream.close()
        self._settle()
        yield sse.event(sse.DONE)
