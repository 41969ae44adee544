"""What a parsed JSON body must be before anything is reserved for it: sendable.

Python's ``json`` reads two things the rest of the path cannot handle, and both would
surface after admission as a 500 (or a reservation held until ``RESERVATION_TTL``):

- nesting deeper than the interpreter's recursion limit allows to copy or encode
  (``copy.deepcopy`` of the upstream body, httpx's ``json.dumps``, any recursive
  walk of a schema), which the parser itself accepts up to about 900 levels;
- a lone surrogate (``"\\ud800"``), which is valid JSON text but not Unicode, so no
  UTF-8 encoder (httpx's included) can send it on.

``check_json`` walks the body once, without recursion, and refuses both with a 400
naming the top-level field they are in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from llm_quota.exceptions import InvalidRequest

#: The deepest nesting accepted, counting the body itself as level 1. Real bodies are
#: shallow: OpenAI's structured outputs allow 10 levels of schema nesting, about 30
#: levels of JSON with ``properties``/``items`` in between, and a tool's parameters
#: are the same. 128 leaves room for any real schema while every recursive step after
#: parsing stays far below Python's default recursion limit of 1,000.
MAX_NESTING = 128

_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def check_json(body: dict[str, Any]) -> None:
    """Raise ``InvalidRequest`` if ``body`` nests deeper than ``MAX_NESTING`` or holds a
    lone surrogate in a key or a string; the ``param`` is the top-level field."""
    # Pairs of (value, depth, top-level field), depth-first; the body is level 1.
    pending: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while pending:
        value, depth, field = pending.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                raise _surrogate(field)
            continue
        items: Iterable[tuple[Any, Any]]
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = ((None, item) for item in value)
        else:
            continue
        if depth > MAX_NESTING:
            raise InvalidRequest(
                f"The request body is nested more than {MAX_NESTING} levels deep.",
                code="nesting_too_deep",
                param=field,
            )
        for key, item in items:
            if isinstance(key, str) and _has_surrogate(key):
                raise _surrogate(field)  # the key itself is never echoed
            if isinstance(item, dict | list | str):
                pending.append((item, depth + 1, field or key))


def _surrogate(field: str | None) -> InvalidRequest:
    return InvalidRequest(
        "The request body contains a lone surrogate (an unpaired \\ud800-\\udfff escape), "
        "which is not valid Unicode.",
        code="invalid_unicode",
        param=field,
    )
