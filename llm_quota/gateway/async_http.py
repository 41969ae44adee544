"""The async gateway's upstream calls, on aiohttp rather than ``httpx.AsyncClient``.

``HttpUpstream`` sends an async call here where aiohttp is installed (the
``[gateway]`` extra) and no proxy is set in the environment (``proxies.direct``),
else on httpx as before. httpx's async client runs httpcore on anyio: cancel scopes,
stream writes and its pool's bookkeeping were about a quarter of a uvicorn worker's
CPU per request (benchmarks, "The async upstream client"). aiohttp's client is
written for asyncio alone, with its HTTP parser in C.

What the calls keep from httpx: the headers (``_auth_headers``, httpx's
``User-Agent``), the JSON encoded once as httpx encodes it (compact, UTF-8, no NaN),
the timeouts (``UPSTREAM_CONNECT_TIMEOUT`` for the connection and its TLS handshake,
``UPSTREAM_READ_TIMEOUT`` for each read), TLS verified against httpx's CA bundle
(certifi's, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), no cookies kept, gzip and deflate
decoded, no cap on the connections (a stream holds one for as long as the LLM writes;
admission bounds the calls in flight), and the errors: every failure is an
``UpstreamError`` raised from aiohttp's own exception, which the release rule reads
(``quota.release_rule``: ``ClientConnectorError`` and ``ConnectionTimeoutError`` are a
connection never made, released; anything after the request went out is charged).

A proxy in the environment keeps httpx rather than aiohttp's ``trust_env``: aiohttp
honours neither ``ALL_PROXY`` nor an HTTPS proxy, and ``trust_env`` would also read
``~/.netrc`` into the upstream's ``Authorization``; the sync path keeps httpx alike.

An ``aiohttp.ClientSession`` belongs to its event loop: each loop gets its own, made
on its first call and closed when the loop shuts down (``loop.shutdown_asyncgens()``,
which ``asyncio.run``, uvicorn and asgiref call), with no unclosed-session warning.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import threading
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiohttp
from asgiref.sync import sync_to_async
from yarl import URL

from llm_quota.gateway import sse
from llm_quota.gateway.upstream_errors import UpstreamError, dropped, invalid, unreachable

#: What aiohttp raises for a failed call: its own errors, and a timeout's.
FAILURES = (aiohttp.ClientError, TimeoutError)
#: Seconds an idle connection is kept: httpx's ``keepalive_expiry``.
KEEPALIVE_SECONDS = 5.0

_ssl_lock = threading.Lock()
_ssl_context: ssl.SSLContext | None = None


def ssl_context() -> ssl.SSLContext:
    """httpx's TLS settings (``httpx.create_ssl_context``: ``SSL_CERT_FILE``, else
    ``SSL_CERT_DIR``, else certifi's bundle; the host checked), made once per process.
    Loading the bundle takes tens of milliseconds: the first call makes it in a thread."""
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            if os.environ.get("SSL_CERT_FILE"):
                context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
            elif os.environ.get("SSL_CERT_DIR"):
                context = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
            else:
                import certifi

                context = ssl.create_default_context(cafile=certifi.where())
            context.set_alpn_protocols(["http/1.1"])
            _ssl_context = context
        return _ssl_context


def _user_agent() -> str:
    """httpx's, which upstreams saw before (as ``sync_sender`` sends it)."""
    try:
        return f"python-httpx/{version('httpx')}"
    except PackageNotFoundError:  # pragma: no cover - httpx is a requirement of the gateway
        return f"aiohttp/{aiohttp.__version__}"


def _failed(exc: BaseException) -> UpstreamError:
    """A failure before the answer's head (or, for a read answer, its body) arrived."""
    return unreachable(exc, timed_out=isinstance(exc, TimeoutError))


class AsyncSender:
    """POSTs JSON bodies to paths under ``base_url``: one session per event loop."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.tls = url.scheme == "https"
        authority = url.netloc.rpartition("@")[2]  # never credentials, as ``sync_sender``
        self.origin = f"{url.scheme}://{authority}"
        self.prefix = url.path.rstrip("/") + "/"
        self.headers = {
            "Accept": "*/*",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": _user_agent(),
            "Content-Type": "application/json",
            **headers,
        }
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._urls: dict[str, URL] = {}
        self._sessions: dict[asyncio.AbstractEventLoop, _LoopSession] = {}

    def url(self, path: str) -> URL:
        """The URL of ``path``, quoted as ``sync_sender`` quotes it, made once per path."""
        url = self._urls.get(path)
        if url is None:
            target = urllib.parse.quote(self.prefix + path.lstrip("/"), safe="/:@!$&'()*+,;=-._~%")
            url = self._urls[path] = URL(self.origin + target, encoded=True)
        return url

    async def session(self) -> aiohttp.ClientSession:
        """This loop's session, made on its first call."""
        loop = asyncio.get_running_loop()
        held = self._sessions.get(loop)
        if held is not None:
            return held.session
        context = await sync_to_async(ssl_context, thread_sensitive=False)() if self.tls else None
        held = self._sessions.get(loop)  # another call made it meanwhile
        if held is None:
            held = self._sessions[loop] = _LoopSession(self, loop, context)
            await held.keeper.__anext__()
        return held.session

    async def _post(self, body: dict[str, Any], path: str) -> aiohttp.ClientResponse:
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        session = await self.session()
        try:
            return await session.post(self.url(path), data=content.encode())
        except FAILURES as exc:
            raise _failed(exc) from exc

    async def complete(self, body: dict[str, Any], path: str) -> dict[str, Any]:
        """The upstream's JSON answer to ``body``; an error answer is its ``UpstreamError``."""
        response = await self._post(body, path)
        try:
            content = await response.read()
        except FAILURES as exc:
            response.close()
            raise _failed(exc) from exc
        except BaseException:
            response.close()
            raise
        if response.status >= 400:
            raise UpstreamError.from_response(response.status, content, response.headers)
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise invalid() from exc
        if not isinstance(data, dict):
            raise invalid()
        return data

    async def stream(self, body: dict[str, Any], path: str) -> AsyncStream:
        """The upstream's event stream for ``body``, its body left to read as it arrives."""
        response = await self._post(body, path)
        if response.status >= 400:
            try:
                content = await response.read()
            except FAILURES:
                content = b""
            finally:
                response.close()
            raise UpstreamError.from_response(response.status, content, response.headers)
        return AsyncStream(response)

    async def aclose(self) -> None:
        """Close this loop's session now (as the loop's shutdown would)."""
        held = self._sessions.get(asyncio.get_running_loop())
        if held is not None:
            await held.keeper.aclose()


class _LoopSession:
    """One loop's session, and the async generator that closes it when the loop shuts
    down: ``shutdown_asyncgens()`` closes every generator the loop has not finished."""

    def __init__(
        self, sender: AsyncSender, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext | None
    ) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS, ssl=context or True
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers=sender.headers,
            timeout=sender.timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self.keeper = self._keep(sender, loop)  # held: the loop's own reference is weak

    async def _keep(
        self, sender: AsyncSender, loop: asyncio.AbstractEventLoop
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            sender._sessions.pop(loop, None)
            await self.session.close()


def _arrived(content: aiohttp.StreamReader) -> bytes:
    """What had arrived when the connection failed: ``readany`` raises the failure
    first, and the events before a reset would be lost (httpx delivered them, and the
    relay charges what was sent). aiohttp's own buffer, read as ``readany`` reads it."""
    try:
        return content._read_nowait(-1) if content._buffer else b""
    except Exception:  # noqa: BLE001 - a newer aiohttp's internals: the events are lost
        return b""


class AsyncStream:
    """An upstream SSE answer: ``async for`` its events' data, then ``aclose()``."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[str]:
        content = self.response.content
        lines, events = sse.LineSplitter(), sse.DataReader()
        failure: BaseException | None = None
        while True:
            try:
                data = await content.readany()
            except FAILURES as exc:
                failure, data = exc, _arrived(content)
            if not data:
                break
            for line in lines.feed(data):
                for event in events.feed(line):
                    yield event
            if failure is not None:
                break
        if failure is not None:
            raise dropped(failure, timed_out=isinstance(failure, TimeoutError)) from failure
        self._ended = True
        for line in lines.end():
            for event in events.feed(line):
                yield event
        for event in events.flush():
            yield event

    async def aclose(self) -> None:
        """Done with the answer: read to its end, its connection is kept for the next
        call; not, it is closed, so the upstream stops generating."""
        if self._ended:
            self.response.release()
        else:
            self.response.close()
