"""Server-sent events, as the Chat Completions API streams them.

Only what the gateway needs: read the ``data`` of each event from an upstream's lines
(``event``/``id``/comments are dropped, multi-line data joined), and write one event.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

DONE = "[DONE]"


def iter_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` payload of each event in ``lines`` (line endings already removed)."""
    buffer: list[str] = []
    for line in lines:
        if not line:
            if buffer:
                yield "\n".join(buffer)
                buffer = []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        field, _, value = line.partition(":")
        if field == "data":
            buffer.append(value[1:] if value.startswith(" ") else value)
    if buffer:  # a stream cut before its final blank line still delivered this event
        yield "\n".join(buffer)


def event(data: str | dict[str, Any]) -> bytes:
    """One event carrying ``data`` (a JSON-able dict, or text such as ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
