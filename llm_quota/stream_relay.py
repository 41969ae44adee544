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


def _settle(guard: QuotaGuard, usage: Any, output: StreamedOutput) -> None:
    if guard.finished:
        return
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        guard.settle(usage)
    else:
        guard.settle_output(output.text)


def _for_client(data: str, chunk: dict[str, Any], include_usage: bool) -> str | None:
    """The event's data as the client should see it, or None to drop it."""
    if include_usage or "usage" not in chunk:
        return data
    if not chunk.get("choices") and chunk.get("usage"):
        return None  # the usage chunk the gateway asked for, not the client
    trimmed = {key: value for key, value in chunk.items() if key != "usage"}
    return json.dumps(trimmed, separators=(",", ":"))


def relay(stream: UpstreamStream, guard: QuotaGuard, *, include_usage: bool) -> Iterator[bytes]:
    """Server-sent events for the client; settles ``guard`` however the stream ends."""
    usage: Any = None
    output = StreamedOutput()
    try:
        for data in stream:
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
                usage = chunk["usage"]
            output.add(chunk)
            shown = _for_client(data, chunk, include_usage)
            if shown is not None:
                yield sse.event(shown)
    except GeneratorExit:
        # The client went away: charge what was generated, give back the rest.
        _settle(guard, usage, output)
        raise
    except UpstreamError as exc:
        _settle(guard, usage, output)
        logger.warning("upstream stream for %s failed: %s", guard.model, exc)
        yield sse.event(error_body(exc.message, type="upstream_error", code=exc.code))
        return
    except BaseException:
        _settle(guard, usage, output)
        raise
    finally:
        stream.close()
    _settle(guard, usage, output)
    yield sse.event(sse.DONE)
