"""The gateway's upstream: any OpenAI-compatible server, or the built-in fake provider.

Both offer the same two calls over a Chat Completions body: ``complete(body)`` returns
the JSON response; ``stream(body)`` returns an ``UpstreamStream`` yielding the ``data``
of each server-sent event, which the caller must ``close()``. Failures are raised as
``UpstreamError`` carrying the status the gateway should answer with. The async
gateway uses the twins (``AsyncHttpUpstream`` on ``httpx.AsyncClient``, the fake
provider's ``AsyncFakeProvider``), whose ``complete``/``stream`` are awaited and whose
streams are iterated with ``async for`` and ``aclose()``d; request building and error
mapping are the same functions for both.

The real upstream is reached with httpx rather than the ``openai`` SDK: a gateway must
forward bodies it does not model (new parameters, vendor extensions) byte for byte,
must not retry on its own (a retried call can be billed twice upstream), and needs
the raw status and error body to hand back. httpx is imported only when
``OPENAI_BASE_URL`` is set; the fake provider needs nothing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from asgiref.sync import sync_to_async

from llm_quota.conf import quota_settings
from llm_quota.gateway import sse

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


class AsyncUpstreamStream(Protocol):
    def __aiter__(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class AsyncUpstream(Protocol):
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def stream(self, body: dict[str, Any]) -> AsyncUpstreamStream: ...


# -- what the sync and async HTTP clients share ------------------------------------------


def _client_options(
    base_url: str, api_key: str | None, connect_timeout: float, read_timeout: float
) -> dict[str, Any]:
    """``httpx.Client``/``AsyncClient`` arguments: one pool per process (per loop)."""
    import httpx

    return {
        "base_url": base_url,
        "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
        "timeout": httpx.Timeout(read_timeout, connect=connect_timeout),
        "limits": httpx.Limits(max_connections=200, max_keepalive_connections=50),
    }


def _request(client: Any, body: dict[str, Any]) -> Any:
    return client.build_request("POST", "chat/completions", json=body)


def _unreachable(exc: Exception) -> UpstreamError:
    """A failure before the upstream answered: the status the gateway reports it with."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, "The upstream timed out.", code="upstream_timeout")
    return UpstreamError(502, f"The upstream is unreachable ({exc}).", code="upstream_unreachable")


def _dropped(exc: Exception) -> UpstreamError:
    """A failure after the stream began."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, "The upstream stopped sending.", code="upstream_timeout")
    return UpstreamError(
        502, f"The upstream connection failed mid-stream ({exc}).", code="upstream_dropped"
    )


def _completion(response: Any) -> dict[str, Any]:
    """The JSON object of a read (non-streamed) response."""
    import httpx

    try:
        data = response.json()
    except (ValueError, httpx.HTTPError) as exc:
        raise UpstreamError(
            502, "The upstream sent invalid JSON.", code="upstream_invalid"
        ) from exc
    if not isinstance(data, dict):
        raise UpstreamError(502, "The upstream sent invalid JSON.", code="upstream_invalid")
    return data


# -- sync --------------------------------------------------------------------------------


class HttpStream:
    """An upstream SSE response, read line by line as it arrives."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __iter__(self) -> Iterator[str]:
        import httpx

        try:
            yield from sse.iter_data(self.response.iter_lines())
        except httpx.HTTPError as exc:
            raise _dropped(exc) from exc

    def close(self) -> None:
        self.response.close()


class HttpUpstream:
    """An OpenAI-compatible server at ``base_url`` (".../v1"), one pooled client per process."""

    def __init__(
        self, base_url: str, api_key: str | None, *, connect_timeout: float, read_timeout: float
    ) -> None:
        import httpx

        self.client = httpx.Client(
            **_client_options(base_url, api_key, connect_timeout, read_timeout)
        )

    def _send(self, body: dict[str, Any], *, stream: bool) -> Any:
        import httpx

        try:
            response = self.client.send(_request(self.client, body), stream=stream)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code >= 400:
            try:
                content = response.read()
            except httpx.HTTPError:
                content = b""
            response.close()
            raise UpstreamError.from_response(response.status_code, content, response.headers)
        return response

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return _completion(self._send(body, stream=False))

    def stream(self, body: dict[str, Any]) -> HttpStream:
        return HttpStream(self._send(body, stream=True))


# -- async -------------------------------------------------------------------------------


class AsyncHttpStream:
    """``HttpStream`` for async code: ``async for`` the payloads, then ``aclose()``."""

    def __init__(self, response: Any) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[str]:
        import httpx

        try:
            async for data in sse.aiter_data(self.response.aiter_lines()):
                yield data
        except httpx.HTTPError as exc:
            raise _dropped(exc) from exc

    async def aclose(self) -> None:
        await self.response.aclose()


class AsyncHttpUpstream:
    """``HttpUpstream`` on ``httpx.AsyncClient``: no thread waits on the upstream.

    An ``AsyncClient`` belongs to the event loop it first ran on, so there is one per
    loop (``get_async_upstream``).
    """

    def __init__(
        self, base_url: str, api_key: str | None, *, connect_timeout: float, read_timeout: float
    ) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            **_client_options(base_url, api_key, connect_timeout, read_timeout)
        )

    async def _send(self, body: dict[str, Any], *, stream: bool) -> Any:
        import httpx

        try:
            response = await self.client.send(_request(self.client, body), stream=stream)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code >= 400:
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            await response.aclose()
            raise UpstreamError.from_response(response.status_code, content, response.headers)
        return response

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return _completion(await self._send(body, stream=False))

    async def stream(self, body: dict[str, Any]) -> AsyncHttpStream:
        return AsyncHttpStream(await self._send(body, stream=True))


_clients: dict[tuple[Any, ...], Upstream] = {}
_lock = threading.Lock()
#: Per event loop, the async client of each configuration.
_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[Any, ...], AsyncHttpUpstream]
] = weakref.WeakKeyDictionary()


def _client_key() -> tuple[Any, ...] | None:
    """What a client is built from, or None for the fake provider (no base URL)."""
    base_url = quota_settings.OPENAI_BASE_URL
    if not base_url:
        return None
    return (
        str(base_url),
        quota_settings.OPENAI_API_KEY,
        float(quota_settings.UPSTREAM_CONNECT_TIMEOUT),
        float(quota_settings.UPSTREAM_READ_TIMEOUT),
    )


def get_upstream() -> Upstream:
    """The configured upstream: ``OPENAI_BASE_URL``, else the fake provider."""
    key = _client_key()
    if key is None:
        from llm_quota.testing.fake_provider import FakeProvider

        return FakeProvider()
    with _lock:
        upstream = _clients.get(key)
        if upstream is None:
            upstream = HttpUpstream(key[0], key[1], connect_timeout=key[2], read_timeout=key[3])
            _clients[key] = upstream
    return upstream


async def get_async_upstream() -> AsyncUpstream:
    """``get_upstream`` for async code, one client per event loop.

    The first call on a loop builds its client in a thread: importing httpx and
    loading the CA bundle for TLS would stall the loop for every request in flight.
    """
    key = _client_key()
    if key is None:
        from llm_quota.testing.fake_provider import AsyncFakeProvider

        return AsyncFakeProvider()
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    upstream = per_loop.get(key)
    if upstream is None:
        built = await sync_to_async(AsyncHttpUpstream, thread_sensitive=False)(
            key[0], key[1], connect_timeout=key[2], read_timeout=key[3]
        )
        upstream = per_loop.setdefault(key, built)  # another request may have won the race
    return upstream
