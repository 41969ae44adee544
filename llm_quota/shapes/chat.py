"""The Chat Completions API shape: what a call is billed for, what caps it, what it used.

Everything the quota needs to know about ``POST /v1/chat/completions``, in one place,
with no I/O, so the gateway views, the DRF throttle and ``@quota_gated`` read a body
the same way (and only once):

- ``ChatRequest``: the body, checked before anything is reserved. Only the fields the
  quota depends on are validated (model, messages, the output cap, ``n``, streaming);
  everything else passes through to the upstream untouched, which validates it as it
  always does, once ``json_limits`` made sure it can be copied and sent (bounded
  nesting, no lone surrogates). A bad value is a 400 in OpenAI's shape that names the
  field, never a 500 and never a reservation.
- ``BILLED_FIELDS``: the body fields the estimate counts (the one list: the guard, the
  admission and the estimator take whatever it names); ``CAP_FIELDS``: the fields that
  cap the output, ``cap_field_for`` the one a model takes, and
  ``ChatRequest.upstream_body`` sets it to the reserved cap.
- ``Used``: what an answer says it used (``read_completion``, ``StreamWatch.used``):
  the upstream's ``usage`` when it sent one, and the text it generated.
- ``StreamWatch``: what happens to each event of a streamed answer.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from llm_quota.exceptions import InvalidRequest
from llm_quota.shapes.base import Used, checked_body, openai_failure, reported_usage

#: The body fields OpenAI bills as input, each passed to the guard under its own name
#: (``QuotaGuard(messages=..., tools=...)``). The one place that decides what is billed:
#: the estimate counts every field named here (``rules.estimation``), the messages part
#: by part (text, images, audio, files), the others as the provider renders them. ``n``
#: and the output cap are billed as output (``quota_kwargs``); reasoning tokens are
#: inside the cap.
BILLED_FIELDS = ("messages", "tools", "functions", "tool_choice", "response_format")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: Both names OpenAI accepts for the output cap; ``max_completion_tokens`` is the newer
#: one (reasoning models accept only it), ``max_tokens`` what most compatible servers read.
CAP_FIELDS = ("max_completion_tokens", "max_tokens")
#: The cap field set when the caller used none: what every compatible server reads.
DEFAULT_CAP_FIELD = "max_tokens"
#: Models that refuse ``max_tokens`` and take ``max_completion_tokens`` (reasoning and
#: visible output together): the o-series and the gpt-5 family, fine-tuned or behind a
#: ``provider/`` prefix too.
COMPLETION_CAP_MODELS = re.compile(r"^(?:ft:|[\w.-]+/)?(?:o\d|gpt-5)")
MAX_CHOICES = 128
#: The final event of a Chat Completions stream (not JSON); the relay sends its own.
DONE = "[DONE]"
#: Where the upstream serves the API, under its base URL.
PATH = "chat/completions"


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
    path: ClassVar[str] = PATH
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
        body, model = checked_body(body)
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
        for name in ("tools", "functions"):
            if body.get(name) is not None and not isinstance(body[name], list):
                raise InvalidRequest(f"'{name}' must be an array.", param=name)
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

    def billed(self) -> dict[str, Any]:
        """The billed parts of the body (``BILLED_FIELDS``) it has, as the estimate counts them."""
        return {name: self.body[name] for name in BILLED_FIELDS if self.body.get(name) is not None}

    def quota_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``quota_guard`` that price this request."""
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "choices": self.choices,
            **self.billed(),
        }

    def upstream_body(self, max_tokens: int, cap_field: str = "") -> dict[str, Any]:
        """The body to send upstream: the reserved cap, and usage in streams.

        The cap goes under the field the model takes (``cap_field_for``; ``cap_field``
        is the price row's say): for a model that takes ``max_completion_tokens`` only
        that field, anything else sent as ``max_tokens`` moved there; otherwise every cap
        field the caller used (``max_tokens`` when they used none). Either way the output
        can never outgrow the reservation. A stream always asks for the final usage
        chunk, so it can be settled exactly.
        """
        body = copy.deepcopy(self.body)
        if cap_field_for(self.model, cap_field) == "max_completion_tokens":
            body.pop("max_tokens", None)
            used = ["max_completion_tokens"]
        else:
            used = [name for name in CAP_FIELDS if body.get(name) is not None]
            used = used or [DEFAULT_CAP_FIELD]
        for name in used:
            body[name] = max_tokens
        if self.stream:
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return body

    def read(self, answer: Any) -> Used:
        return read_completion(answer)

    def watch(self) -> StreamWatch:
        return StreamWatch(self.include_usage)


def cap_field_for(model: str, configured: str = "") -> str:
    """The field that caps ``model``'s output: the price row's ``output_cap_field`` when
    set, else ``max_completion_tokens`` for the o-series and gpt-5, else ``max_tokens``."""
    if configured:
        return configured
    return "max_completion_tokens" if COMPLETION_CAP_MODELS.match(model) else DEFAULT_CAP_FIELD


# -- what an answer used -------------------------------------------------------------------

#: Everything the model wrote is billed as output: the message content, refusals, tool
#: call names and arguments, and the reasoning text some compatible servers stream
#: (``reasoning_content``/``reasoning``). Counting all of it errs on the side of
#: charging, like the estimate does.
TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")


def _parts(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return []
    parts = [message[name] for name in TEXT_FIELDS if isinstance(message.get(name), str)]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts += [
                function[k] for k in ("name", "arguments") if isinstance(function.get(k), str)
            ]
    return parts


def _choice_parts(body: Any, field: str) -> list[str]:
    choices = body.get("choices") if isinstance(body, dict) else None
    parts: list[str] = []
    for choice in choices or []:
        if isinstance(choice, dict):
            parts += _parts(choice.get(field))
    return parts


def read_completion(completion: Any) -> Used:
    """What a non-streamed ``chat.completion`` body used."""
    usage = completion.get("usage") if isinstance(completion, dict) else None
    return Used(reported_usage(usage), "".join(_choice_parts(completion, "message")))


class StreamedOutput:
    """Collects the deltas of a streamed completion as they pass through."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def add(self, chunk: Any) -> None:
        self._parts += _choice_parts(chunk, "delta")

    @property
    def text(self) -> str:
        return "".join(self._parts)


def _for_client(data: str, chunk: dict[str, Any], include_usage: bool) -> str | None:
    """The event's data as the client should see it, or None to drop it."""
    if include_usage or "usage" not in chunk:
        return data
    if not chunk.get("choices") and chunk.get("usage"):
        return None  # the usage chunk the gateway asked for, not the client
    trimmed = {key: value for key, value in chunk.items() if key != "usage"}
    return json.dumps(trimmed, separators=(",", ":"))


class StreamWatch:
    """What happens to each event of a streamed answer: what to pass on, what it used.

    Feed it each upstream payload (``feed``); once ``ended`` is true the stream is over
    (``[DONE]``, or an error chunk). ``complete`` says the upstream sent its ``[DONE]``:
    a stream that stops without one (or without an error chunk) was cut short, however
    cleanly its connection closed. The usage-only final chunk (the gateway always asks
    for one) is passed on only to a client that asked for it (``include_usage``).
    """

    #: Chat streams are data-only events, closed by ``[DONE]``.
    event_name: str | None = None
    done: str | None = DONE
    failure = staticmethod(openai_failure)

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.ended = False
        self.complete = False
        self.output = StreamedOutput()
        self._usage: Any = None

    @property
    def used(self) -> Used:
        return Used(reported_usage(self._usage), self.output.text)

    def feed(self, data: str) -> str | None:
        """The payload to pass on to the client for one upstream payload, or None."""
        if data.strip() == DONE:
            self.ended = self.complete = True  # the relay sends its own [DONE] once settled
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            return data  # not ours to judge: pass it on untouched
        if chunk.get("error"):
            # The upstream reported a failure inside the stream; it ends here.
            self.ended = True
            return data
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        self.output.add(chunk)
        return _for_client(data, chunk, self.include_usage)
