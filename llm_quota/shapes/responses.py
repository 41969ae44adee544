"""The Responses API shape (``POST /v1/responses``): billed, capped and read like chat.

- ``ResponsesRequest``: the body, checked before anything is reserved: ``input`` (a
  string, or an array of items: messages with text or image parts, function calls and
  their outputs...), ``instructions``, ``tools``, ``max_output_tokens`` (the cap, which
  includes reasoning tokens), ``stream``. Other fields pass through untouched.
  ``previous_response_id`` and ``conversation`` are refused: the upstream would bill a
  stored conversation as input that the gateway cannot see, so it could not be
  reserved (send the items instead); so is ``background: true``, billed after the call
  returns. So are hosted tools (``CLIENT_TOOL_TYPES``: only tools the caller runs):
  their per-call fees and fetched content cannot be bounded before the call.
- What is billed: the instructions as a system message and the input items as
  messages (``rules.estimation`` counts items part by part, like chat messages), plus
  ``tools``, ``tool_choice`` and ``text`` (its format's schema) as structured fields.
- The cap: ``max_output_tokens``, always sent, set to what was reserved.
- What it used: ``usage`` (``input_tokens``, ``output_tokens`` with reasoning inside,
  ``input_tokens_details.cached_tokens``) from the answer or from the stream's
  ``response.completed`` (or ``.incomplete``/``.failed``); else the output text counted.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from llm_quota.exceptions import InvalidRequest
from llm_quota.shapes.base import Used, checked_body, openai_failure, reported_usage

PATH = "responses"
CAP_FIELD = "max_output_tokens"
#: Fields that make the upstream bill input the gateway cannot see (or count).
STORED_CONTEXT = ("previous_response_id", "conversation")
#: Billed as structured fields besides the input (``rules.estimation``).
BILLED_FIELDS = ("tools", "tool_choice", "text")
#: Tools the caller runs itself: the upstream bills only the tokens of their definitions,
#: calls and outputs, which the estimate counts. Hosted tools (``web_search``,
#: ``file_search``, ``code_interpreter``, ``image_generation``, ``mcp``...) bill per call
#: and add content the gateway never sees, so no reservation could bound them.
CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
#: The events that end a whole stream, each carrying the final ``response`` (and its usage).
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _check_tools(tools: list[Any]) -> None:
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in CLIENT_TOOL_TYPES:
            raise InvalidRequest(
                f"'tools[{index}]': a {str(kind)[:40]!r} tool is not supported by this "
                "gateway: a hosted tool bills per call and for content no reservation can "
                "bound. Use function tools and run them yourself.",
                code="unsupported_tool",
                param=f"tools[{index}]",
            )


def _cap(body: dict[str, Any]) -> int | None:
    value = body.get(CAP_FIELD)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{CAP_FIELD}' must be a positive integer.", param=CAP_FIELD)
    return value


def _input(value: Any) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            "'input' must be a string or a non-empty array of input items.", param="input"
        )
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"'input[{index}]' must be an object.", param=f"input[{index}]")
        content = item.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'input[{index}].content' must be a string or an array of parts.",
                param=f"input[{index}].content",
            )
    return value


@dataclass(frozen=True)
class ResponsesRequest:
    path: ClassVar[str] = PATH
    body: dict[str, Any]
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None
    max_tokens: int | None
    stream: bool

    @classmethod
    def from_body(cls, body: Any) -> ResponsesRequest:
        """Validate a parsed JSON body, or raise ``InvalidRequest`` naming the field."""
        body, model = checked_body(body)
        for name in STORED_CONTEXT:
            if body.get(name) is not None:
                raise InvalidRequest(
                    f"'{name}' is not supported by this gateway: the stored conversation "
                    "would be billed as input it cannot count. Send the items as 'input'.",
                    code="unsupported_parameter",
                    param=name,
                )
        if body.get("background"):
            raise InvalidRequest(
                "'background' is not supported by this gateway: a background response is "
                "billed after the call returns, when nothing is left to settle it.",
                code="unsupported_parameter",
                param="background",
            )
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string.", param="instructions")
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            raise InvalidRequest("'tools' must be an array.", param="tools")
        _check_tools(body.get("tools") or [])
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean.", param="stream")
        return cls(
            body=body,
            model=model,
            input=_input(body.get("input")),
            instructions=instructions,
            max_tokens=_cap(body),
            stream=bool(stream),
        )

    def messages(self) -> list[Any]:
        """The prompt as the estimate counts it: instructions first, then the items."""
        items: list[Any] = (
            [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        )
        if self.instructions:
            return [{"role": "system", "content": self.instructions}, *items]
        return items

    def quota_kwargs(self) -> dict[str, Any]:
        billed = {name: self.body[name] for name in BILLED_FIELDS if self.body.get(name)}
        return {
            "model": self.model,
            "messages": self.messages(),
            "max_tokens": self.max_tokens,
            **billed,
        }

    def upstream_body(self, max_tokens: int, cap_field: str = "") -> dict[str, Any]:
        """The body with ``max_output_tokens`` set to the reserved cap (reasoning inside)."""
        body = copy.deepcopy(self.body)
        body[CAP_FIELD] = max_tokens
        return body

    def read(self, answer: Any) -> Used:
        return read_response(answer)

    def watch(self) -> ResponsesWatch:
        return ResponsesWatch()


# -- what an answer used -------------------------------------------------------------------


def _item_parts(item: Any) -> list[str]:
    """The text an output item holds: message text and refusals, function call names
    and arguments, reasoning summaries; anything else as its JSON (charged, not lost)."""
    if not isinstance(item, dict):
        return []
    kind = item.get("type")
    if kind == "message":
        parts = []
        for part in item.get("content") or []:
            if isinstance(part, dict):
                parts += [part[k] for k in ("text", "refusal") if isinstance(part.get(k), str)]
        return parts
    if kind == "function_call":
        return [item[k] for k in ("name", "arguments") if isinstance(item.get(k), str)]
    if kind == "reasoning":
        return [
            part["text"] for part in item.get("summary") or []
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]  # fmt: skip
    return [json.dumps(item, ensure_ascii=False, default=str)]


def output_text(response: Any) -> str:
    output = response.get("output") if isinstance(response, dict) else None
    return "".join(part for item in output or [] for part in _item_parts(item))


def read_response(response: Any) -> Used:
    """What a ``response`` object used."""
    usage = response.get("usage") if isinstance(response, dict) else None
    return Used(reported_usage(usage), output_text(response))


class ResponsesWatch:
    """What happens to each event of a streamed response (``shapes.base.Watch``).

    Every event is passed on as it came, under its ``type`` as the SSE event name. The
    text of every ``*.delta`` event is kept (output text, refusals, function call
    arguments, reasoning summaries), and the final event's ``response.usage``. The
    stream is whole once a final event (``FINAL_EVENTS``) came; an ``error`` event
    ends it too (passed on: the SDK raises it). There is no ``[DONE]``.
    """

    done: str | None = None
    failure = staticmethod(openai_failure)

    def __init__(self) -> None:
        self.ended = False
        self.complete = False
        self.event_name: str | None = None
        self._parts: list[str] = []
        self._final: Any = None

    @property
    def used(self) -> Used:
        if self._final is not None:
            used = read_response(self._final)
            return Used(used.usage, used.text or "".join(self._parts))
        return Used(None, "".join(self._parts))

    def feed(self, data: str) -> str | None:
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.event_name = None
            return data  # not ours to judge: pass it on untouched
        kind = event.get("type")
        self.event_name = kind if isinstance(kind, str) and kind.isprintable() else None
        if kind in FINAL_EVENTS:
            self._final = event.get("response")
            self.ended = self.complete = True
        elif kind == "error" or event.get("error") and kind is None:
            self.ended = True
        elif isinstance(kind, str) and kind.endswith(".delta"):
            delta = event.get("delta")
            if isinstance(delta, str):
                self._parts.append(delta)
        return data
