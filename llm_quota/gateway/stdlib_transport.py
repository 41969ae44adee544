"""Kept-alive connections to one upstream host, on the standard library's sockets.

The sync gateway's sender (``sync_sender``) sends each call on a connection from here:
httpx's own pool (httpcore) spent about a fifth of a sync worker's CPU per request on
its bookkeeping (benchmarks, "The sync path shaved"), for a job this small: one
connection per call, a thread holds it for the call's length, and an idle one goes
back to the pool. Failures are raised as httpx's exceptions, so the release rule
(``quota.release_rule``) and the gateway's error answers (``upstream._unreachable``,
``upstream._dropped``) see exactly what httpx would have raised: a refused or
timed-out connect is ``ConnectError``/``ConnectTimeout`` (never sent, released),
anything after the request went out a read or write error (charged).

No cap on the connections: each is held by one of the worker's threads, so there are
never more than its threads (httpx's cap of 200 was never reached in the sync view).
At most ``max_idle`` are kept once idle; an idle one the server closed meanwhile is
seen by a ``poll`` of its socket and dropped before use, as httpcore does.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


def alive(sock: socket.socket) -> bool:
    """Whether an idle connection can carry a request: a socket with something to read
    before anything was asked (the server's close, or bytes out of turn) cannot.
    ``poll`` rather than ``select``: ``select`` fails on descriptors past 1,024."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    readable, _, _ = select.select([sock], [], [], 0)  # pragma: no cover (Windows)
    return not readable


@contextmanager
def reading() -> Iterator[None]:
    """Failures after the request was sent, as httpx raises them."""
    try:
        yield
    except TimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out") from exc
    except http.client.HTTPException as exc:  # closed before answering, a bad status
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except OSError as exc:
        raise httpx.ReadError(str(exc)) from exc


@contextmanager
def writing() -> Iterator[None]:
    """Failures while the request is sent, as httpx raises them."""
    try:
        yield
    except TimeoutError as exc:
        raise httpx.WriteTimeout(str(exc) or "timed out") from exc
    except OSError as exc:
        raise httpx.WriteError(str(exc)) from exc


class ConnectionPool:
    """Connections to ``host``:``port`` (TLS with ``tls``), kept alive between calls."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int = 50,
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._ssl: ssl.SSLContext | None = None

    def acquire(self) -> socket.socket:
        """An idle connection still open (the most recent first), else a new one."""
        while True:
            with self._lock:
                if self._pid != os.getpid():  # a forked child: its parent's are not its own
                    self._idle, self._pid = [], os.getpid()
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return self.connect()
            if alive(sock):
                return sock
            sock.close()

    def release(self, sock: socket.socket) -> None:
        """Keep a connection whose last response was read to its end, for the next call."""
        with self._lock:
            if len(self._idle) < self.max_idle and self._pid == os.getpid():
                self._idle.append(sock)
                return
        sock.close()

    def connect(self) -> socket.socket:
        """A new connection, its TLS handshake included, within ``connect_timeout``."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:  # refused, unreachable, a name that does not resolve
            raise httpx.ConnectError(str(exc)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                sock = self.ssl_context().wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except TimeoutError as exc:
            sock.close()
            raise httpx.ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:  # ssl.SSLError among them: a certificate refused
            sock.close()
            raise httpx.ConnectError(str(exc)) from exc
        return sock

    def ssl_context(self) -> ssl.SSLContext:
        """httpx's own TLS settings (its CA bundle, ``SSL_CERT_FILE``), made once."""
        if self._ssl is None:
            context: Any = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()
