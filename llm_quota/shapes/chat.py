"""A Chat Completions request body, checked before anything is reserved.

Only the fields the quota depends on are validated here (model, messages, the output
cap, ``n``, streaming); everything else passes through to the upstream untouched,
which validates it as it always does. A bad value is a 400 in OpenAI's shape that
names the field, never a 500 and never a reservation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from llm_quota.exceptions import InvalidRequest
from llm_quota.ledger import keys

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: Both names OpenAI accepts for the output cap; ``max_completion_tokens`` is the newer
#: one (reasoning models accept only it), ``max_tokens`` what most compatible servers read.
CAP_FIELDS = ("max_completion_tokens", "max_tokens")
MAX_CHOICES = 128


def _positive_int(body: dict[str, Any], name: str, upper: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
    if upper is not None and value > upper:
        raise InvalidRequest(f"'{name}' may be at most {upper}.", param=name)
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequest(
                f"'{where}.role' must be one of {', '.join(sorted(ROLES))}.",
                param=f"{where}.role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'{where}.content' must be a string or an array of parts.",
                param=f"{where}.content",
            )
    return value


@dataclass(frozen=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None
    choices: int
    stream: bool
    include_usage: bool
    tools: Any

    @classmethod
    def from_body(cls, body: Any) -> ChatRequest:
        """Validate a parsed JSON body, or raise ``InvalidRequest`` naming the field."""
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required and must be a string.", param="model")
        if not keys.is_valid_model_name(model):
            raise InvalidRequest(f"'{model[:80]}' is not a valid model name.", param="model")
        messages = _messages(body.get("messages"))
        caps = [cap for cap in (_positive_int(body, name) for name in CAP_FIELDS) if cap]
        choices = _positive_int(body, "n", MAX_CHOICES) or 1
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean.", param="stream")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise InvalidRequest(
                    "'stream_options' is only allowed when 'stream' is true.",
                    param="stream_options",
                )
            if not isinstance(options, dict):
                raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
            include_usage = options.get("include_usage", False)
            if not isinstance(include_usage, bool):
                raise InvalidRequest(
                    "'stream_options.include_usage' must be a boolean.",
                    param="stream_options.include_usage",
                )
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise InvalidRequest("'tools' must be an array.", param="tools")
        return cls(
            body=body,
            model=model,
            messages=messages,
            max_tokens=min(caps) if caps else None,
            choices=choices,
            stream=stream,
            include_usage=include_usage,
            tools=tools,
        )

    def quota_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``quota_guard`` that price this request."""
        return {
            "model": self.model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "tools": self.tools,
            "choices": self.choices,
        }

    def upstream_body(self, max_tokens: int) -> dict[str, Any]:
        """The body to send upstream: the reserved cap, and usage in streams.

        Every cap field the caller used is set to ``max_tokens`` (``max_tokens`` when
        they used none), so the output can never outgrow the reservation. A stream
        always asks for the final usage chunk, so it can be settled exactly.
        """
        body = copy.deepcopy(self.body)
        used = [name for name in CAP_FIELDS if body.get(name) is not None] or ["max_tokens"]
        for name in used:
            body[name] = max_tokens
        if self.stream:
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return body
