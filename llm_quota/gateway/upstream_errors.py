"""The gateway's upstream failures: ``UpstreamError`` and the errors both upstream
clients (httpx in ``upstream``, aiohttp in ``async_http``) raise, so the answers and the
release rule's decisions do not depend on which client made the call. The rule reads
the error's ``__cause__`` (``gateway.call.billed_nothing``): each builder is raised
``from`` the client's own exception."""

from __future__ import annotations

import json
from typing import Any

#: Upstream statuses that are about the gateway's own credentials: the caller cannot fix
#: them, and passing a 401 on would make the SDK blame the caller's token.
GATEWAY_FAULTS = frozenset({401, 403})
#: Upstream headers worth passing on with an error (when and whether to retry).
PASSED_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")


class UpstreamError(Exception):
    """The upstream refused, failed or could not be reached."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        error: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        #: The upstream's own ``error`` object, when it sent one in OpenAI's shape.
        self.error = error
        self.headers = headers or {}

    @classmethod
    def from_response(cls, status: int, content: bytes, headers: Any) -> UpstreamError:
        error = None
        try:
            data = json.loads(content)
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                error = data["error"]
        except ValueError:
            pass
        passed = {name: headers[name] for name in PASSED_HEADERS if name in headers}
        if status in (429, 503) and "retry-after" not in passed:
            passed["retry-after"] = "1"  # every 429 and 503 says when to come back
        if status in GATEWAY_FAULTS:
            return cls(
                502,
                f"The upstream refused the gateway's credentials (HTTP {status}).",
                code="upstream_auth_failed",
            )
        snippet = content[:200].decode("utf-8", "replace")
        message = (error or {}).get("message") or f"The upstream answered HTTP {status}: {snippet}"
        return cls(status, str(message), code="upstream_error", error=error, headers=passed)


def unreachable(exc: BaseException, *, timed_out: bool) -> UpstreamError:
    """A failure before the upstream answered: the status the gateway reports it with."""
    if timed_out:
        return UpstreamError(504, "The upstream timed out.", code="upstream_timeout")
    return UpstreamError(502, f"The upstream is unreachable ({exc}).", code="upstream_unreachable")


def dropped(exc: BaseException, *, timed_out: bool) -> UpstreamError:
    """A failure after the stream began."""
    if timed_out:
        return UpstreamError(504, "The upstream stopped sending.", code="upstream_timeout")
    return UpstreamError(
        502, f"The upstream connection failed mid-stream ({exc}).", code="upstream_dropped"
    )


def invalid() -> UpstreamError:
    """An answer that is not a JSON object."""
    return UpstreamError(502, "The upstream sent invalid JSON.", code="upstream_invalid")
