"""What every API shape offers the gateway: one request adapter per API.

A shape says, with no I/O, what a request is billed for (``quota_kwargs``), which field
caps its output (``upstream_body`` sets it to the reserved cap), where the upstream
serves it (``path``), what an answer used (``read``) and what happens to each event of a
streamed answer (``watch``). The gateway's admission, settle, relay and headers are
written once over these (``gateway.call``, ``gateway.relay``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from llm_quota.exceptions import InvalidRequest
from llm_quota.ledger import keys
from llm_quota.shapes.json_limits import check_json


@dataclass(frozen=True)
class Used:
    """What a call used, as its answer tells: settle from ``usage`` when the upstream
    reported one (``text`` standing in for a bad output count), else from ``text``,
    what it generated (counted with the model's encoding)."""

    usage: dict[str, Any] | None
    text: str


def checked_body(
    body: Any,
    *,
    missing_model: str = "'model' is required and must be a string.",
    bad_model: str = "'{model}' is not a valid model name.",
) -> tuple[dict[str, Any], str]:
    """The checks every API's body starts with: a JSON object that can be sent on
    (``check_json``: nesting bounded, no lone surrogates) and a valid model name. The
    messages are the API's own (``bad_model`` is formatted with the name's first 80
    characters). Returns the body and its model."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    check_json(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(missing_model, param="model")
    if not keys.is_valid_model_name(model):
        raise InvalidRequest(bad_model.format(model=model[:80]), param="model")
    return body, model


def reported_usage(usage: Any) -> dict[str, Any] | None:
    """An upstream's ``usage`` object, else None: the caller then settles from the
    generated text. Its counts are checked when settled: one that cannot be charged
    (a string, a negative, 0 for a long answer, ``1e20``) is replaced there, field by
    field (``quota.admission.usage_plan``)."""
    return usage if isinstance(usage, dict) else None


def openai_failure(message: str, code: str | None) -> tuple[str | None, dict[str, Any]]:
    """The event that ends an OpenAI stream the upstream broke off: an unnamed ``error``
    payload, which the ``openai`` SDK raises as ``APIError``."""
    error = {"message": message, "type": "upstream_error", "code": code, "param": None}
    return None, {"error": error}


class Watch(Protocol):
    """What happens to each event of a streamed answer (``shapes.chat.StreamWatch``).

    ``feed`` returns the payload to pass on (or None to drop it); ``event_name`` is the
    SSE ``event:`` name of the payload just fed (None: data only); once ``ended`` the
    stream is over, and ``complete`` says it ended as the API ends a whole answer
    (else it was cut short). ``done`` is the payload that closes a whole stream
    (chat's ``[DONE]``; None where the last event is the API's own). ``failure`` is the
    (event name, payload) that ends a stream the upstream broke off, in the API's shape.
    """

    ended: bool
    complete: bool
    event_name: str | None
    done: str | None

    @property
    def used(self) -> Used: ...

    def feed(self, data: str) -> str | None: ...

    def failure(self, message: str, code: str | None) -> tuple[str | None, dict[str, Any]]: ...


class ShapeRequest(Protocol):
    """A request body of one API, checked (``from_body``) before anything is reserved."""

    #: The upstream's path for this API, under its base URL.
    path: ClassVar[str]
    model: str
    stream: bool

    def quota_kwargs(self) -> dict[str, Any]: ...

    def upstream_body(self, max_tokens: int, cap_field: str = "") -> dict[str, Any]: ...

    def read(self, answer: Any) -> Used: ...

    def watch(self) -> Watch: ...
