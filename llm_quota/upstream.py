"""The gateway's upstream: any OpenAI-compatible server, or the built-in fake provider.

Both offer the same two calls over a Chat Completions body: ``complete(body)`` returns
the JSON response; ``stream(body)`` returns an ``UpstreamStream`` yielding the ``data``
of each server-sent event, which the caller must ``close()``. Failures are raised as
``UpstreamError`` carrying the status the gateway should answer with.

The real upstream is reached with httpx rather than the ``openai`` SDK: a gateway must
forward bodies it does not model (new parameters, vendor extensions) byte for byte,
must not retry on its own (a retried call can be billed twice upstream), and needs
the raw status and error body to hand back. httpx is imported only when
``OPENAI_BASE_URL`` is set; the fake provider needs nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from llm_quota import sse
from llm_quota.conf import quota_settings

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


class UpstreamStream(Protocol):
    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, body: dict[str, Any]) -> UpstreamStream: ...


class HttpStream:
    """An upstream SSE response, read line by line as it arrives."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __iter__(self) -> Iterator[str]:
        import httpx

        try:
            yield from sse.iter_data(self.response.iter_lines())
        except httpx.TimeoutException as exc:
            raise UpstreamError(
                504, "The upstream stopped sending.", code="upstream_timeout"
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(
                502, f"The upstream connection failed mid-stream ({exc}).", code="upstream_dropped"
            ) from exc

    def close(self) -> None:
        self.response.close()


class HttpUpstream:
    """An OpenAI-compatible server at ``base_url`` (".../v1"), one pooled client per process."""

    def __init__(
        self, base_url: str, api_key: str | None, *, connect_timeout: float, read_timeout: float
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    def _send(self, body: dict[str, Any], *, stream: bool) -> Any:
        import httpx

        request = self.client.build_request("POST", "chat/completions", json=body)
        try:
            response = self.client.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            raise UpstreamError(504, "The upstream timed out.", code="upstream_timeout") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(
                502, f"The upstream is unreachable ({exc}).", code="upstream_unreachable"
            ) from exc
        if response.status_code >= 400:
            try:
                content = response.read()
            except httpx.HTTPError:
                content = b""
            response.close()
            raise UpstreamError.from_response(response.status_code, content, response.headers)
        return response

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        response = self._send(body, stream=False)
        try:
            data = response.json()
        except (ValueError, httpx.HTTPError) as exc:
            raise UpstreamError(
                502, "The upstream sent invalid JSON.", code="upstream_invalid"
            ) from exc
        if not isinstance(data, dict):
            raise UpstreamError(502, "The upstream sent invalid JSON.", code="upstream_invalid")
        return data

    def stream(self, body: dict[str, Any]) -> HttpStream:
        return HttpStream(self._send(body, stream=True))


_clients: dict[tuple[Any, ...], Upstream] = {}
_lock = threading.Lock()


def get_upstream() -> Upstream:
    """The configured upstream: ``OPENAI_BASE_URL``, else the fake provider."""
    base_url = quota_settings.OPENAI_BASE_URL
    if not base_url:
        from llm_quota.fake_provider import FakeProvider

        return FakeProvider()
    key = (
        str(base_url),
        quota_settings.OPENAI_API_KEY,
        float(quota_settings.UPSTREAM_CONNECT_TIMEOUT),
        float(quota_settings.UPSTREAM_READ_TIMEOUT),
    )
    with _lock:
        upstream = _clients.get(key)
        if upstream is None:
            upstream = HttpUpstream(key[0], key[1], connect_timeout=key[2], read_timeout=key[3])
            _clients[key] = upstream
    return upstream
