"""``JSONParser``: DRF's, with one more way for a body to be unreadable.

Python's ``json`` refuses nesting deeper than the recursion limit (about a thousand
levels of ``[``) with ``RecursionError``, which DRF's parser does not catch: the
caller got a 500. Here it is a ``ParseError`` like any other bad JSON, a 400 before
anything is authenticated or reserved. Shallower bodies that are still too deep to
send on are refused by ``shapes.json_limits``.
"""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply.") from None
