"""The Anthropic Messages API shape (``POST /v1/messages``).

- ``MessagesRequest``: the body, checked before anything is reserved: ``model``,
  ``max_tokens`` (required by the API; the cap, thinking included), ``messages``
  (``user``/``assistant`` turns, content a string or blocks), ``system`` (a string or
  text blocks), ``tools``, ``tool_choice``, ``stream``. Other fields pass through.
- What is billed: ``system`` as a system message, then the messages, counted in UTF-8
  bytes (``rules.estimation.BYTES_ENCODING``: no Claude tokenizer ships offline, and a
  token covers at least one byte, so the bytes bound the count from above; images at
  the estimator's worst case, documents at the context window); ``tools`` and
  ``tool_choice`` as structured fields, plus ``TOOL_PROMPT_TOKENS`` for the system
  prompt Anthropic adds when tools are given. A body that asks for prompt caching has
  its prompt reserved at the cache-write premium of the longest TTL it names
  (``cache_write_premium``: 1.25x for 5 minutes, 2x for an hour).
- The cap: ``max_tokens``, set to what was reserved (clamped like chat's).
- What it used: ``usage`` from the answer, or from the stream's ``message_start``
  (input) and ``message_delta`` (output, cumulative); cache reads as cached input, cache
  writes at their premium (``CACHE_WRITE_PREMIUM``) as input. Else the output text.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from llm_quota.exceptions import InvalidRequest
from llm_quota.rules.accounting import token_count
from llm_quota.rules.estimation import FIXED_TOKENS
from llm_quota.shapes.base import Used, checked_body

PATH = "messages"
CAP_FIELD = "max_tokens"
ROLES = frozenset({"user", "assistant"})
#: Anthropic's tool-use system prompt, added to every request with ``tools``: 346 tokens
#: on the Claude 4 models, 530 on the largest of the older ones (Anthropic's "Tool use:
#: pricing" table). Bounded from above with room to spare.
TOOL_PROMPT_TOKENS = 600
#: Cache writes are billed at 1.25 times the input price (5-minute cache) or twice it
#: (1-hour cache); charged as that many input tokens.
CACHE_WRITE_PREMIUM = {"ephemeral_5m_input_tokens": Decimal("1.25"),
                       "ephemeral_1h_input_tokens": Decimal("2")}  # fmt: skip
#: The events that end a whole stream.
STOP_EVENT = "message_stop"


def _positive_int(body: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{name}: must be a positive integer (required).", param=name)
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages: must be a non-empty array.", param="messages")
    for index, message in enumerate(value):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where}: must be an object.", param=where)
        if message.get("role") not in ROLES:
            raise InvalidRequest(
                f"{where}.role: must be 'user' or 'assistant'.", param=f"{where}.role"
            )
        if not isinstance(message.get("content"), str | list):
            raise InvalidRequest(
                f"{where}.content: must be a string or an array of content blocks.",
                param=f"{where}.content",
            )
    return value


@dataclass(frozen=True)
class MessagesRequest:
    path: ClassVar[str] = PATH
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    stream: bool

    @classmethod
    def from_body(cls, body: Any) -> MessagesRequest:
        """Validate a parsed JSON body, or raise ``InvalidRequest`` naming the field."""
        body, model = checked_body(
            body,
            missing_model="model: Field required (a string).",
            bad_model="model: '{model}' is not a valid model name.",
        )
        max_tokens = _positive_int(body, CAP_FIELD, required=True)
        assert max_tokens is not None
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise InvalidRequest("system: must be a string or an array of text blocks.",
                                 param="system")  # fmt: skip
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            raise InvalidRequest("tools: must be an array.", param="tools")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("stream: must be a boolean.", param="stream")
        return cls(
            body=body,
            model=model,
            messages=_messages(body.get("messages")),
            max_tokens=max_tokens,
            stream=bool(stream),
        )

    def quota_kwargs(self) -> dict[str, Any]:
        system = self.body.get("system")
        messages = self.messages
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        billed: dict[str, Any] = {
            name: self.body[name] for name in ("tools", "tool_choice") if self.body.get(name)
        }
        if self.body.get("tools"):
            billed[FIXED_TOKENS] = TOOL_PROMPT_TOKENS
        premium = cache_write_premium(self.body)
        if premium is not None:
            billed["prompt_premium"] = premium
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, **billed}

    def upstream_body(self, max_tokens: int, cap_field: str = "") -> dict[str, Any]:
        """The body with ``max_tokens`` set to the reserved cap (thinking inside)."""
        body = copy.deepcopy(self.body)
        body[CAP_FIELD] = max_tokens
        return body

    def read(self, answer: Any) -> Used:
        return read_message(answer)

    def watch(self) -> MessagesWatch:
        return MessagesWatch()


def cache_write_premium(body: Any) -> Decimal | None:
    """What a prompt may cost per token when the body asks for prompt caching (a
    ``cache_control`` anywhere: system, messages, tools): Anthropic may bill all of it as
    cache writes, at the premium of the longest TTL named. None: no caching asked."""
    ttls: set[str] = set()
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            control = item.get("cache_control")
            if control is not None:
                ttl = control.get("ttl") if isinstance(control, dict) else None
                ttls.add(
                    "ephemeral_1h_input_tokens" if ttl == "1h" else "ephemeral_5m_input_tokens"
                )
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return max((CACHE_WRITE_PREMIUM[ttl] for ttl in ttls), default=None)


# -- what an answer used -------------------------------------------------------------------


def charged_usage(usage: Any) -> dict[str, Any] | None:
    """Anthropic's ``usage`` as the ledger reads it (``input_tokens``, ``output_tokens``,
    ``input_tokens_details.cached_tokens``): cache reads are cached input, cache writes
    input at their premium. None where there is no usage object."""
    if not isinstance(usage, dict):
        return None
    uncached = token_count(usage.get("input_tokens"))
    read = token_count(usage.get("cache_read_input_tokens")) or 0
    written = usage.get("cache_creation")
    if isinstance(written, dict):
        premium = sum(
            (token_count(written.get(name)) or 0) * rate
            for name, rate in CACHE_WRITE_PREMIUM.items()
        )
    else:  # no breakdown: the dearer rate
        premium = (token_count(usage.get("cache_creation_input_tokens")) or 0) * Decimal(2)
    whole = -int(-premium // 1)  # rounded up
    return {
        "input_tokens": None if uncached is None else uncached + read + whole,
        "output_tokens": usage.get("output_tokens"),
        "input_tokens_details": {"cached_tokens": read},
    }


def _block_parts(block: Any) -> list[str]:
    """The text a content block holds: text, thinking, a tool call's name and input."""
    if not isinstance(block, dict):
        return []
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return [block["text"]]
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        return [block["thinking"]]
    if kind in ("tool_use", "server_tool_use"):
        return [str(block.get("name") or ""), json.dumps(block.get("input"), default=str)]
    return [json.dumps(block, ensure_ascii=False, default=str)]


def read_message(message: Any) -> Used:
    """What a ``message`` answer used."""
    if not isinstance(message, dict):
        return Used(None, "")
    text = "".join(part for block in message.get("content") or [] for part in _block_parts(block))
    return Used(charged_usage(message.get("usage")), text)


#: The text each kind of ``content_block_delta`` carries.
DELTA_TEXT = {"text_delta": "text", "thinking_delta": "thinking",
              "input_json_delta": "partial_json"}  # fmt: skip


class MessagesWatch:
    """What happens to each event of a streamed message (``shapes.base.Watch``).

    Every event is passed on as it came, under its ``type`` as the SSE event name (the
    Anthropic SDK reads the name). The usage is ``message_start``'s input counts,
    updated by each ``message_delta``'s (its output count is cumulative); the text of
    every delta is kept. The stream is whole at ``message_stop``; an ``error`` event ends it too.
    """

    done: str | None = None

    @staticmethod
    def failure(message: str, code: str | None) -> tuple[str | None, dict[str, Any]]:
        """Anthropic's ``error`` event, which the ``anthropic`` SDK raises."""
        return "error", {"type": "error", "error": {"type": "api_error", "message": message}}

    def __init__(self) -> None:
        self.ended = False
        self.complete = False
        self.event_name: str | None = None
        self._parts: list[str] = []
        self._usage: dict[str, Any] | None = None

    @property
    def used(self) -> Used:
        return Used(charged_usage(self._usage), "".join(self._parts))

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._usage = {**(self._usage or {}), **usage}

    def feed(self, data: str) -> str | None:
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.event_name = None
            return data
        kind = event.get("type")
        self.event_name = kind if isinstance(kind, str) and kind.isprintable() else None
        if kind == "message_start" and isinstance(event.get("message"), dict):
            # Its output count is a placeholder (1): only message_delta's counts, so a
            # stream cut before one is charged its counted text, not one token.
            usage = event["message"].get("usage")
            if isinstance(usage, dict):
                self._merge({k: v for k, v in usage.items() if k != "output_tokens"})
        elif kind == "message_delta":
            self._merge(event.get("usage"))
        elif kind == "content_block_start":
            self._parts += _block_parts(event.get("content_block"))[:1]
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            delta = event["delta"]
            value = delta.get(DELTA_TEXT.get(str(delta.get("type")), ""))
            if isinstance(value, str):
                self._parts.append(value)
        elif kind == STOP_EVENT:
            self.ended = self.complete = True
        elif kind == "error":
            self.ended = True
        return data
