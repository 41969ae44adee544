"""The sync gateway's upstream calls, sent without httpx's per-request machinery.

``HttpUpstream`` sends a sync call here unless a proxy is configured in the
environment (``proxies.direct``). httpx builds a ``Request`` (URL merged with the base URL,
headers merged and validated), then walks its auth, redirect and cookie layers and
httpcore's pool for every call: in a profile of the sync view that was about 30% of a
worker's CPU per request. Here what does not change between calls is made once per
upstream and path: the request line and every header but the length; a call encodes
its JSON once (as httpx does: compact, UTF-8, no NaN) and writes head and body
together on a kept-alive connection (``stdlib_transport``). The answer is parsed by
``http.client``.

What it does not do that ``httpx.Client`` did: keep cookies an upstream sets (they
would have been shared by every user of the process), follow a proxy from the
environment (such a deployment keeps httpx), HTTP/2 (httpx had it off). Responses
compressed with gzip or deflate are decoded, as httpx decodes them; stream lines end
with ``\\n`` or ``\\r\\n`` (a lone ``\\r``, which no LLM API sends, is not a line end).
The answer quacks like the ``httpx.Response`` the shared helpers of ``upstream`` read
(``status_code``, ``headers``, ``read``, ``json``, ``iter_lines``, ``close``), and
every failure is one of httpx's exceptions (``stdlib_transport``).
"""

from __future__ import annotations

import codecs
import http.client
import json
import socket
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import Any

import httpx

from llm_quota.gateway.stdlib_transport import ConnectionPool, reading, writing

#: Bytes read from a streamed answer at a time (less when less has arrived).
READ_SIZE = 65_536


def _checked(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("an upstream header value has a line break")
    return value


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sendall``, with the timeout applying to each write as httpx applies it, not to
    the whole body (``sendall``'s): a large body to a slow upstream is not cut off."""
    view = memoryview(data)
    while view:
        view = view[sock.send(view) :]


class SyncSender:
    """POSTs JSON bodies to paths under ``base_url``, on kept-alive connections."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        url = urllib.parse.urlsplit(base_url)
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        host = url.hostname or ""
        self.prefix = url.path.rstrip("/") + "/"
        self.pool = ConnectionPool(
            host, port, tls=tls, connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        authority = url.netloc.rpartition("@")[2]  # never credentials in a Host header
        fixed = {
            "Host": authority,
            "Accept": "*/*",
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
            "User-Agent": f"python-httpx/{httpx.__version__}",  # what upstreams saw before
            "Content-Type": "application/json",
            **headers,
        }
        self.headers = "".join(f"{name}: {_checked(value)}\r\n" for name, value in fixed.items())
        self._heads: dict[str, str] = {}

    def _head(self, path: str) -> str:
        """The request line and the fixed headers for ``path``, made once per path."""
        head = self._heads.get(path)
        if head is None:
            target = urllib.parse.quote(self.prefix + path.lstrip("/"), safe="/:@!$&'()*+,;=-._~%")
            head = self._heads[path] = f"POST {target} HTTP/1.1\r\n{self.headers}"
        return head

    def send(self, body: dict[str, Any], path: str, *, stream: bool) -> SentResponse:
        """Send ``body`` to ``path``; with ``stream``, the answer's body is left to read
        as it arrives, else it is read here (its failures raised here, as httpx does)."""
        content = json.dumps(
            body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
        request = f"{self._head(path)}Content-Length: {len(content)}\r\n\r\n".encode("latin-1")
        sock = self.pool.acquire()
        try:
            with writing():
                send_all(sock, request + content)
            raw = http.client.HTTPResponse(sock, method="POST")
            with reading():
                raw.begin()
            response = SentResponse(self.pool, sock, raw)
            if not stream:
                response.read()
        except BaseException:
            sock.close()
            raise
        return response


class SentResponse:
    """An upstream's answer: what ``upstream``'s helpers read of an ``httpx.Response``."""

    def __init__(self, pool: ConnectionPool, sock: socket.socket, raw: http.client.HTTPResponse):
        self.status_code = raw.status
        #: Case-insensitive, as httpx's: ``name in headers``, ``headers[name]``.
        self.headers = raw.msg
        self._pool, self._sock, self._raw = pool, sock, raw
        self._content: bytes | None = None
        self._done = False
        encoding = (raw.getheader("Content-Encoding") or "").strip().lower()
        # wbits 47: a gzip or a zlib header, whichever it is; -15: raw deflate
        self._inflate = (
            zlib.decompressobj(47 if encoding in ("gzip", "x-gzip") else 15)
            if encoding in ("gzip", "x-gzip", "deflate")
            else None
        )

    def _decoded(self, data: bytes, final: bool = False) -> bytes:
        if self._inflate is None:
            return data
        try:
            out = self._inflate.decompress(data)
            return out + self._inflate.flush() if final else out
        except zlib.error as exc:
            raise httpx.DecodingError(str(exc)) from exc

    def read(self) -> bytes:
        """The whole body (read once; the connection then goes back to the pool)."""
        if self._content is None:
            try:
                with reading():
                    data = self._raw.read()
                self._content = self._decoded(data, final=True)
            except BaseException:
                self.close()
                raise
            self._finish()
        return self._content

    def json(self) -> Any:
        return json.loads(self.read())

    def iter_lines(self) -> Iterator[str]:
        """The body's text line by line, each as soon as it has arrived."""
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            with reading():
                data = self._raw.read1(READ_SIZE)
            if not data:
                break
            pending += text.decode(self._decoded(data))
            *lines, pending = pending.split("\n")
            for line in lines:
                yield line.removesuffix("\r")
        pending += text.decode(self._decoded(b"", final=True), final=True)
        self._finish()
        if pending:
            yield pending.removesuffix("\r")

    def _finish(self) -> None:
        """The body is read to its end: keep the connection unless the server won't."""
        if self._done:
            return
        self._done = True
        self._raw.close()
        if self._raw.will_close:
            self._sock.close()
        else:
            self._pool.release(self._sock)

    def close(self) -> None:
        """Done with the answer: a body not read to its end closes the connection (so
        the upstream stops generating), as httpx's ``close()`` does."""
        if self._done:
            return
        self._done = True
        self._raw.close()
        self._sock.close()
