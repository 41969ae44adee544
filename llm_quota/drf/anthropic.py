"""Answers in the Anthropic Messages API's shape, for ``/v1/messages``.

Every answer is first made in OpenAI's shape (``errors``, ``headers``: one place
decides statuses, messages and rate-limit headers), then rewritten here, so the
``anthropic`` SDK raises the right class and retries right:

- an error body becomes ``{"type": "error", "error": {"type", "message"}}``, its
  ``type`` Anthropic's for the status (``rate_limit_error`` for 429...);
- ``retry-after`` and ``x-should-retry`` stay (the SDK reads both);
- the ``x-ratelimit-*`` headers are repeated as Anthropic's
  ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``, the reset an
  RFC 3339 time, as Anthropic sends it.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from django.http import HttpResponseBase, JsonResponse

#: Anthropic's error types by status ("Errors" in Anthropic's API reference).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def seconds_of(go_duration: str) -> float:
    """Seconds in a duration as ``headers.go_duration`` writes it ("1m30s", "250ms")."""
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(go_duration))


def ratelimit_headers(response: HttpResponseBase) -> dict[str, str]:
    """Anthropic's rate-limit headers, from the OpenAI ones ``response`` carries."""
    now = datetime.now(UTC)
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        if not response.has_header(f"x-ratelimit-limit-{kind}"):
            continue
        reset = now + timedelta(seconds=seconds_of(response[f"x-ratelimit-reset-{kind}"]))
        headers[f"anthropic-ratelimit-{kind}-limit"] = response[f"x-ratelimit-limit-{kind}"]
        headers[f"anthropic-ratelimit-{kind}-remaining"] = response[f"x-ratelimit-remaining-{kind}"]
        headers[f"anthropic-ratelimit-{kind}-reset"] = reset.isoformat(timespec="seconds")
    return headers


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_answer(response: HttpResponseBase | None) -> Any:
    """``response`` (in OpenAI's shape) in Anthropic's: errors rewritten, the rate-limit
    headers repeated under Anthropic's names. A success body is left as it is."""
    if response is None:
        return None
    answer = response
    if response.status_code >= 400 and isinstance(response, JsonResponse):
        try:
            error = json.loads(response.content).get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        body = {"type": "error", "error": {"type": error_type(response.status_code),
                                           "message": str(error.get("message") or "")}}  # fmt: skip
        answer = JsonResponse(body, status=response.status_code)
        for name, value in response.items():
            if name.lower() not in ("content-type", "content-length"):
                answer[name] = value
    for name, value in ratelimit_headers(response).items():
        answer[name] = value
    return answer
