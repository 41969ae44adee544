"""The gateway's upstream: the OpenAI-compatible server at ``OPENAI_BASE_URL`` (and,
for Anthropic's Messages API, the one at ``ANTHROPIC_BASE_URL`` where set), or the
class ``LLM_QUOTA["UPSTREAM"]`` names.

An upstream offers two calls over a request body, each sync and async, posted to
``path`` under its base URL (``chat/completions`` unless told: ``responses``,
``embeddings``, ``messages``; an upstream class written for chat alone is only ever
called without it): ``complete(body)``/``acomplete(body)`` return the JSON response;
``stream(body)``/``astream(body)`` return a stream yielding the ``data`` of each
server-sent event (``for``, then ``close()``; or ``async for``, then ``aclose()``),
the final ``[DONE]`` included: a stream that stops without it was cut short, and the
relay tells the client so.
Failures are raised as ``UpstreamError`` carrying the status the gateway should
answer with. With neither setting, every call fails with a 502
(``upstream_not_configured``): the gateway never invents answers on its own.

The real upstream is reached with httpx rather than the ``openai`` SDK: a gateway must
forward bodies it does not model (new parameters, vendor extensions) byte for byte,
must not retry on its own (a retried call can be billed twice upstream), and needs
the raw status and error body to hand back. httpx is imported only when
``OPENAI_BASE_URL`` is used; sync calls go out through ``sync_sender`` and async ones
through aiohttp (``async_http``) where they can (no proxy in the environment, aiohttp
installed), with the same bytes, answers and errors (``upstream_errors``).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol, cast

from asgiref.sync import sync_to_async
from django.utils.module_loading import import_string

from llm_quota.conf import quota_settings
from llm_quota.gateway import sse
from llm_quota.gateway.proxies import direct
from llm_quota.gateway.upstream_errors import (  # noqa: F401 - re-exported: their old home
    GATEWAY_FAULTS,
    PASSED_HEADERS,
    UpstreamError,
    dropped,
    invalid,
    unreachable,
)

#: The path of the Chat Completions API, the one every upstream serves.
CHAT_PATH = "chat/completions"


class UpstreamStream(Protocol):
    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class AsyncUpstreamStream(Protocol):
    def __aiter__(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """What ``LLM_QUOTA["UPSTREAM"]`` names: a class built with no arguments. ``path``
    is passed only for APIs besides chat (``gateway.call``)."""

    def complete(self, body: dict[str, Any], path: str = CHAT_PATH) -> dict[str, Any]: ...

    def stream(self, body: dict[str, Any], path: str = CHAT_PATH) -> UpstreamStream: ...

    async def acomplete(self, body: dict[str, Any], path: str = CHAT_PATH) -> dict[str, Any]: ...

    async def astream(self, body: dict[str, Any], path: str = CHAT_PATH) -> AsyncUpstreamStream: ...


class NotConfigured:
    """The upstream when none is configured: every call is a 502, never an invented answer."""

    def _refuse(self, body: dict[str, Any], path: str = CHAT_PATH) -> Any:
        raise UpstreamError(
            502,
            "The gateway has no upstream: set LLM_QUOTA['OPENAI_BASE_URL'] "
            "(or LLM_QUOTA['UPSTREAM']).",
            code="upstream_not_configured",
        )

    complete = stream = _refuse

    async def acomplete(self, body: dict[str, Any], path: str = CHAT_PATH) -> dict[str, Any]:
        return self._refuse(body)

    async def astream(self, body: dict[str, Any], path: str = CHAT_PATH) -> AsyncUpstreamStream:
        return self._refuse(body)


# -- what the sync and async HTTP clients share ------------------------------------------


#: The path of Anthropic's Messages API, sent to ``ANTHROPIC_BASE_URL`` where one is set.
MESSAGES_PATH = "messages"
#: The Messages API version the gateway speaks (the ``anthropic`` SDK's default).
ANTHROPIC_VERSION = "2023-06-01"


def _auth_headers(api_key: str | None, scheme: str) -> dict[str, str]:
    """An OpenAI-compatible server takes a bearer key; Anthropic's API ``x-api-key``
    and the version of the API spoken."""
    if scheme == "anthropic":
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        return {**headers, "x-api-key": api_key} if api_key else headers
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _client_options(
    base_url: str,
    api_key: str | None,
    connect_timeout: float,
    read_timeout: float,
    scheme: str = "openai",
    *,
    max_connections: int | None = 200,
) -> dict[str, Any]:
    """``httpx.Client``/``AsyncClient`` arguments: one pool per process (per loop)."""
    import httpx

    return {
        "base_url": base_url,
        "headers": _auth_headers(api_key, scheme),
        "timeout": httpx.Timeout(read_timeout, connect=connect_timeout),
        "limits": httpx.Limits(max_connections=max_connections, max_keepalive_connections=50),
    }


def _request(client: Any, body: dict[str, Any], path: str) -> Any:
    return client.build_request("POST", path, json=body)


def _unreachable(exc: Exception) -> UpstreamError:
    """A failure of httpx's before the upstream answered (``upstream_errors``)."""
    import httpx

    return unreachable(exc, timed_out=isinstance(exc, httpx.TimeoutException))


def _dropped(exc: Exception) -> UpstreamError:
    """A failure of httpx's after the stream began."""
    import httpx

    return dropped(exc, timed_out=isinstance(exc, httpx.TimeoutException))


def _completion(response: Any) -> dict[str, Any]:
    """The JSON object of a read (non-streamed) response."""
    import httpx

    try:
        data = response.json()
    except (ValueError, httpx.HTTPError) as exc:
        raise invalid() from exc
    if not isinstance(data, dict):
        raise invalid()
    return data


def _refusal(response: Any, content: bytes) -> UpstreamError:
    """The error for an upstream answer of status 400 or more, its body read."""
    return UpstreamError.from_response(response.status_code, content, response.headers)


def _drained(response: Any) -> bytes:
    """The body of an error answer (empty if it cannot be read), its connection closed."""
    import httpx

    try:
        return response.read()
    except httpx.HTTPError:
        return b""
    finally:
        response.close()


async def _adrained(response: Any) -> bytes:
    import httpx

    try:
        return await response.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await response.aclose()


class HttpStream:
    """An upstream SSE response, read line by line as it arrives: ``for``, or ``async for``."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __iter__(self) -> Iterator[str]:
        import httpx

        try:
            yield from sse.iter_data(self.response.iter_lines())
        except httpx.HTTPError as exc:
            raise _dropped(exc) from exc

    async def __aiter__(self) -> AsyncIterator[str]:
        import httpx

        try:
            async for data in sse.aiter_data(self.response.aiter_lines()):
                yield data
        except httpx.HTTPError as exc:
            raise _dropped(exc) from exc

    def close(self) -> None:
        self.response.close()

    async def aclose(self) -> None:
        await self.response.aclose()


class HttpUpstream:
    """An OpenAI-compatible server at ``base_url`` (".../v1").

    One pooled sender per process for sync calls (``sender``) and, since an
    ``httpx.AsyncClient`` belongs to the event loop it first ran on, one per loop for
    async calls, so no thread waits on the upstream there.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        connect_timeout: float,
        read_timeout: float,
        scheme: str = "openai",
    ) -> None:
        self.options = (base_url, api_key, connect_timeout, read_timeout, scheme)
        self._client: Any = None
        self._sender: Any = None  # a ``SyncSender``, False for none, None until known
        self._async_sender: Any = None  # an ``AsyncSender``, the same
        self._lock = threading.Lock()
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._async_builds: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def client(self) -> Any:
        import httpx

        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = httpx.Client(**_client_options(*self.options))
        return self._client

    @property
    def sender(self) -> Any:
        """The sync calls' sender (``sync_sender``), or None where a proxy in the
        environment keeps them on ``client``."""
        if self._sender is None:
            from llm_quota.gateway import sync_sender

            base_url, api_key, connect_timeout, read_timeout, scheme = self.options
            with self._lock:
                if self._sender is None:
                    self._sender = (
                        sync_sender.SyncSender(
                            base_url,
                            _auth_headers(api_key, scheme),
                            connect_timeout=connect_timeout,
                            read_timeout=read_timeout,
                        )  # fmt: skip
                        if direct(base_url)
                        else False
                    )
        return self._sender or None

    @property
    def async_sender(self) -> Any:
        """The async calls' sender (``async_http``, on aiohttp), or None where aiohttp is
        not installed or a proxy in the environment keeps them on ``aclient``."""
        if self._async_sender is None:
            try:
                from llm_quota.gateway import async_http
            except ImportError:  # no aiohttp: httpx's AsyncClient, as before
                self._async_sender = False
                return None
            base_url, api_key, connect_timeout, read_timeout, scheme = self.options
            with self._lock:
                if self._async_sender is None:
                    self._async_sender = (
                        async_http.AsyncSender(
                            base_url,
                            _auth_headers(api_key, scheme),
                            connect_timeout=connect_timeout,
                            read_timeout=read_timeout,
                        )  # fmt: skip
                        if direct(base_url)
                        else False
                    )
        return self._async_sender or None

    async def aclient(self) -> Any:
        """This loop's client. The first call on a loop builds it in a thread: importing
        httpx and loading the CA bundle for TLS would stall every request on the loop.
        Calls that arrive meanwhile wait for that one build: a burst on a fresh worker
        built a client (and an SSL context) per call, 240 of them in 13 s."""
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            async with self._async_builds.setdefault(loop, asyncio.Lock()):
                client = self._async_clients.get(loop)
                if client is None:
                    build = sync_to_async(_async_client, thread_sensitive=False)
                    client = self._async_clients[loop] = await build(self.options)
        return client

    def _send(self, body: dict[str, Any], path: str, *, stream: bool) -> Any:
        import httpx

        sender = self.sender
        try:
            if sender is not None:
                response = sender.send(body, path, stream=stream)
            else:
                client = self.client
                response = client.send(_request(client, body, path), stream=stream)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code >= 400:
            raise _refusal(response, _drained(response))
        return response

    async def _asend(self, body: dict[str, Any], path: str, *, stream: bool) -> Any:
        import httpx

        client = await self.aclient()
        try:
            response = await client.send(_request(client, body, path), stream=stream)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code >= 400:
            raise _refusal(response, await _adrained(response))
        return response

    def complete(self, body: dict[str, Any], path: str = CHAT_PATH) -> dict[str, Any]:
        return _completion(self._send(body, path, stream=False))

    def stream(self, body: dict[str, Any], path: str = CHAT_PATH) -> HttpStream:
        return HttpStream(self._send(body, path, stream=True))

    async def acomplete(self, body: dict[str, Any], path: str = CHAT_PATH) -> dict[str, Any]:
        sender = self.async_sender
        if sender is not None:
            return cast(dict[str, Any], await sender.complete(body, path))
        return _completion(await self._asend(body, path, stream=False))

    async def astream(self, body: dict[str, Any], path: str = CHAT_PATH) -> AsyncUpstreamStream:
        sender = self.async_sender
        if sender is not None:
            return cast(AsyncUpstreamStream, await sender.stream(body, path))
        return HttpStream(await self._asend(body, path, stream=True))


def _async_client(options: tuple[Any, ...]) -> Any:
    """An event loop's client, with no cap on its connections: a call holds one for as
    long as the LLM writes (HTTP/1.1), so a cap would be a cap on the calls in flight
    per worker, hidden. Beyond it, admitted streams waited for a stream to end, up to
    ``UPSTREAM_READ_TIMEOUT``: 200 per worker held 500 streams of 20 s to a first-token
    p99 of 12.8 s (benchmarks, section 11). Admission bounds the calls in flight; the
    sync client keeps its cap, as its threads bound them anyway."""
    import httpx

    return httpx.AsyncClient(**_client_options(*options, max_connections=None))


_clients: dict[tuple[Any, ...], HttpUpstream] = {}
_configured_upstreams: dict[str, Upstream] = {}
_lock = threading.Lock()


def _http_upstream(base_url: str, api_key: str | None, scheme: str = "openai") -> HttpUpstream:
    """The ``HttpUpstream`` of the current settings, one per configuration and process."""
    key = (
        str(base_url),
        api_key,
        float(quota_settings.UPSTREAM_CONNECT_TIMEOUT),
        float(quota_settings.UPSTREAM_READ_TIMEOUT),
        scheme,
    )
    with _lock:
        upstream = _clients.get(key)
        if upstream is None:
            upstream = HttpUpstream(
                key[0], key[1], connect_timeout=key[2], read_timeout=key[3], scheme=scheme
            )
            _clients[key] = upstream
    return upstream


def _configured(dotted: str) -> Upstream:
    """One instance per process of the class ``UPSTREAM`` names: it may hold a pool."""
    with _lock:
        upstream = _configured_upstreams.get(dotted)
        if upstream is None:
            upstream = _configured_upstreams[dotted] = import_string(dotted)()
    return upstream


def get_upstream(path: str = CHAT_PATH) -> Upstream:
    """The configured upstream for ``path``: an instance of ``UPSTREAM``'s class where one
    is named; for Anthropic's ``messages``, the API at ``ANTHROPIC_BASE_URL`` where one is
    set; else the server at ``OPENAI_BASE_URL``; else ``NotConfigured``."""
    dotted = quota_settings.UPSTREAM
    if dotted:
        return _configured(dotted)
    anthropic_url = quota_settings.ANTHROPIC_BASE_URL
    if path == MESSAGES_PATH and anthropic_url:
        return _http_upstream(anthropic_url, quota_settings.ANTHROPIC_API_KEY, "anthropic")
    base_url = quota_settings.OPENAI_BASE_URL
    if not base_url:
        return NotConfigured()
    return _http_upstream(base_url, quota_settings.OPENAI_API_KEY)
