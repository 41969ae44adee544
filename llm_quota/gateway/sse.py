"""Server-sent events, as the OpenAI and Anthropic APIs stream them.

Only what the gateway needs: read the ``data`` of each event from an upstream's lines
(``event``/``id``/comments are dropped, multi-line data joined: every API the gateway
serves repeats the event's name in its data's ``type``), and write one event, named
where the API names them (the Responses and Messages APIs; the Anthropic SDK reads
the name).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any


class DataReader:
    """Turns lines into event payloads one line at a time: the parsing both the sync
    and the async readers share (``iter_data``, ``aiter_data``)."""

    def __init__(self) -> None:
        self._buffer: list[str] = []

    def feed(self, line: str) -> tuple[str, ...]:
        """The payload of the event ``line`` ends (a blank line), if any."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return ()  # a comment (keep-alive)
        field, _, value = line.partition(":")
        if field == "data":
            self._buffer.append(value[1:] if value.startswith(" ") else value)
        return ()

    def flush(self) -> tuple[str, ...]:
        """What is left: a stream cut before its final blank line still delivered it."""
        if not self._buffer:
            return ()
        data, self._buffer = "\n".join(self._buffer), []
        return (data,)


class LineSplitter:
    """Turns the bytes of a body, as they arrive, into its lines: UTF-8 decoded, ends
    (``\\n`` or ``\\r\\n``) removed, as ``sync_sender``'s ``iter_lines`` splits them.
    No bound on a line's length: the Responses API sends the whole answer in its last
    event (aiohttp's own ``readline`` refuses lines past 128 KiB)."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[str] = []

    def feed(self, data: bytes) -> list[str]:
        """The lines ``data`` ends (none while a line is still arriving)."""
        text = self._text.decode(data)
        if "\n" not in text:
            self._pending.append(text)
            return []
        *lines, rest = text.split("\n")
        if self._pending:
            lines[0] = "".join(self._pending) + lines[0]
        self._pending = [rest] if rest else []
        return [line.removesuffix("\r") for line in lines]

    def end(self) -> list[str]:
        """The last line, where the body did not end with a line end."""
        last = "".join(self._pending) + self._text.decode(b"", final=True)
        self._pending = []
        return [last.removesuffix("\r")] if last else []


def iter_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` payload of each event in ``lines`` (line endings already removed)."""
    reader = DataReader()
    for line in lines:
        yield from reader.feed(line)
    yield from reader.flush()


async def aiter_data(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """``iter_data`` over an async stream of lines (``httpx`` ``aiter_lines``)."""
    reader = DataReader()
    async for line in lines:
        for data in reader.feed(line):
            yield data
    for data in reader.flush():
        yield data


def event(data: str | dict[str, Any], name: str | None = None) -> bytes:
    """One event carrying ``data`` (a JSON-able dict, or text such as ``[DONE]``),
    named ``name`` where given."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {text}\n\n".encode()
