"""The sync upstream calls' own sender (``gateway.sync_sender``, ``stdlib_transport``):
connections kept alive and dropped when the upstream closed them, the bytes httpx
sent, and every failure raised as httpx raised it, so the release rule decides as it
did (``gateway.call.billed_nothing``). The gateway's own tests (``test_upstream``,
``test_stream_endings``, ``test_upstream_release_rule``) run through it too."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from llm_quota.gateway.call import billed_nothing
from llm_quota.gateway.upstream import HttpUpstream, UpstreamError, _client_options

BODY = {"model": "m", "messages": [{"role": "user", "content": "héllo ☃"}], "max_tokens": 5}
COMPLETION = json.dumps({"id": "c", "choices": [], "usage": {"total_tokens": 3}}).encode()
Answer = Callable[[socket.socket, bytes], bool]  # writes an answer; False closes


def ok(body: bytes = COMPLETION, headers: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def chunked(*parts: bytes) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    return head + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)


class Upstream:
    """A loopback server that answers each request with ``answer``, and counts the
    connections it accepted and the requests it read."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None, pace: float = 0) -> None:
        self.answer = answer
        self.tls = tls
        self.pace = pace  # seconds to wait after each read of a body: a slow reader
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        if pace:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:  # the client refused the certificate
                conn.close()
                return
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        self.closed_by_client.set()
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buffer) < length:
                    buffer += conn.recv(262144)
                    time.sleep(self.pace)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                if not self.answer(conn, self.requests[-1]):
                    return

    def close(self) -> None:
        self.listener.close()


@contextmanager
def serving(answer: Answer, read_timeout: float = 5) -> Iterator[tuple[Upstream, HttpUpstream]]:
    server = Upstream(answer)
    client = HttpUpstream(f"http://127.0.0.1:{server.port}/v1", "sk-test",
                          connect_timeout=2, read_timeout=read_timeout)  # fmt: skip
    try:
        yield server, client
    finally:
        server.close()
        if client.sender is not None:
            client.sender.pool.close()


def answering(data: bytes, keep: bool = True) -> Answer:
    def answer(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(data)
        return keep

    return answer


def test_calls_share_one_kept_alive_connection():
    with serving(answering(ok())) as (server, upstream):
        for _ in range(3):
            assert upstream.complete(BODY)["id"] == "c"
        assert server.connections == 1


def test_a_connection_the_upstream_closed_while_idle_is_not_used():
    """The server closes each connection after its answer without saying so (as an
    idle timeout does): the next call sees it closed and opens another."""
    with serving(answering(ok(), keep=False)) as (server, upstream):
        for _ in range(3):
            assert upstream.complete(BODY)["id"] == "c"
            time.sleep(0.05)  # the server's close arrives
        assert server.connections == 3


def test_the_request_is_what_httpx_sent():
    with serving(answering(ok())) as (server, upstream):
        upstream.complete(BODY, path="responses")
    head, _, content = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/responses HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Authorization"] == "Bearer sk-test"
    assert headers["Content-Type"] == "application/json"
    assert headers["Host"] == f"127.0.0.1:{server.port}"
    with httpx.Client(**_client_options(f"http://127.0.0.1:{server.port}/v1", "k", 1, 1)) as c:
        sent = c.build_request("POST", "responses", json=BODY)
    assert content == sent.read()  # byte for byte, UTF-8 unescaped
    assert sent.url.raw_path == b"/v1/responses"


def test_a_refused_connection_is_502_and_billed_nothing():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    upstream = HttpUpstream(f"http://127.0.0.1:{port}/v1", None, connect_timeout=2, read_timeout=2)
    with pytest.raises(UpstreamError) as raised:
        upstream.complete(BODY)
    assert raised.value.status == 502 and raised.value.code == "upstream_unreachable"
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert billed_nothing(raised.value)


def test_an_answer_that_never_comes_is_504_and_charged():
    def silent(conn: socket.socket, request: bytes) -> bool:
        time.sleep(1)
        return False

    with serving(silent, read_timeout=0.2) as (_server, upstream):
        with pytest.raises(UpstreamError) as raised:
            upstream.complete(BODY)
    assert raised.value.status == 504 and raised.value.code == "upstream_timeout"
    assert isinstance(raised.value.__cause__, httpx.ReadTimeout)
    assert not billed_nothing(raised.value)


def test_a_connection_closed_before_the_answer_is_502_and_charged():
    with serving(lambda conn, request: False) as (_server, upstream):
        with pytest.raises(UpstreamError) as raised:
            upstream.complete(BODY)
    assert raised.value.status == 502
    assert isinstance(raised.value.__cause__, httpx.RemoteProtocolError)
    assert not billed_nothing(raised.value)


def test_an_error_answer_is_passed_on_and_its_connection_kept():
    error = json.dumps({"error": {"message": "slow down", "type": "rate"}}).encode()
    answer = ok(error).replace(b"200 OK", b"429 Too Many Requests", 1)
    answer = answer.replace(b"\r\n\r\n", b"\r\nRetry-After: 7\r\n\r\n", 1)
    with serving(answering(answer)) as (server, upstream):
        for _ in range(2):
            with pytest.raises(UpstreamError) as raised:
                upstream.complete(BODY)
            assert raised.value.status == 429 and raised.value.message == "slow down"
            assert raised.value.headers["retry-after"] == "7"
            assert billed_nothing(raised.value)
        assert server.connections == 1


def test_a_stream_is_read_line_by_line_and_its_connection_kept():
    events = chunked(b'data: {"a": 1}\r\n\r\ndata: {"b"', b": 2}\n\n", b"data: [DONE]\n\n", b"")
    with serving(answering(events)) as (server, upstream):
        for _ in range(2):
            stream = upstream.stream(BODY)
            assert list(stream) == ['{"a": 1}', '{"b": 2}', "[DONE]"]
            stream.close()
        assert server.connections == 1


def test_a_stream_dropped_midway_raises_as_dropped():
    def drop(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(chunked(b'data: {"a": 1}\n\n'))
        time.sleep(0.05)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        return False  # closed with a reset, mid-body

    with serving(drop) as (_server, upstream):
        stream = upstream.stream(BODY)
        read = []
        with pytest.raises(UpstreamError) as raised:
            for data in stream:
                read.append(data)
        stream.close()
    assert read == ['{"a": 1}']
    assert raised.value.code == "upstream_dropped"


def test_a_stream_closed_before_its_end_closes_the_connection():
    """So the upstream stops generating, as it did when httpx closed the response."""

    def endless(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(chunked(b'data: {"a": 1}\n\n'))
        return True  # never ends the body; waits for the next request, or the close

    with serving(endless) as (server, upstream):
        stream = upstream.stream(BODY)
        assert next(iter(stream)) == '{"a": 1}'
        stream.close()
        assert server.closed_by_client.wait(2)
        assert upstream.sender.pool._idle == []


def test_a_gzip_answer_is_decoded():
    answer = ok(gzip.compress(COMPLETION), headers="Content-Encoding: gzip\r\n")
    with serving(answering(answer)) as (_server, upstream):
        assert upstream.complete(BODY)["id"] == "c"


def test_a_proxy_in_the_environment_keeps_httpx(monkeypatch):
    """httpx sends through ``HTTPS_PROXY`` and the like; the sender would not."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    upstream = HttpUpstream("https://api.example/v1", None, connect_timeout=1, read_timeout=1)
    assert upstream.sender is None


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1, and its key."""
    return make_certificate(tmp_path)


def make_certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def tls_server(certificate) -> Upstream:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return Upstream(answering(ok()), tls=context)


def test_an_https_upstream_is_verified_as_httpx_verifies_it(certificate, monkeypatch):
    """httpx's TLS settings: ``SSL_CERT_FILE`` names the CA bundle, the host is checked;
    the connection is kept alive as over plain HTTP."""
    server = tls_server(certificate)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    upstream = HttpUpstream(f"https://127.0.0.1:{server.port}/v1", "k",
                            connect_timeout=5, read_timeout=5)  # fmt: skip
    try:
        for _ in range(2):
            assert upstream.complete(BODY)["id"] == "c"
        assert server.connections == 1
    finally:
        server.close()
        upstream.sender.pool.close()


def test_an_untrusted_certificate_is_502_and_billed_nothing(certificate):
    server = tls_server(certificate)
    upstream = HttpUpstream(f"https://127.0.0.1:{server.port}/v1", "k",
                            connect_timeout=5, read_timeout=5)  # fmt: skip
    try:
        with pytest.raises(UpstreamError) as raised:
            upstream.complete(BODY)
    finally:
        server.close()
    assert raised.value.status == 502
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert billed_nothing(raised.value)


def test_a_large_body_to_a_slow_reader_is_timed_per_write_as_httpx_times_it():
    """The read timeout bounds each write, not the whole body (``sendall``'s)."""
    server = Upstream(answering(ok()), pace=0.005)
    upstream = HttpUpstream(f"http://127.0.0.1:{server.port}/v1", None,
                            connect_timeout=2, read_timeout=0.5)  # fmt: skip
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 12_000_000}]}
    try:
        began = time.monotonic()
        assert upstream.complete(big)["id"] == "c"
        assert time.monotonic() - began > 0.5  # longer than the timeout, all told
    finally:
        server.close()
        upstream.sender.pool.close()
