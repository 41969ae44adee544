"""Both ends of the long-stream bench, each its own process, lean enough to never be
the bottleneck: a fake streaming model and a client that times what it receives.

``python -m tests.benchmarks.stream_ends upstream PORT INTERVAL LENGTH``

    An OpenAI-shaped ``/chat/completions`` that streams one chunk at once, then one
    every ``INTERVAL`` seconds for ``LENGTH`` seconds (or as many chunks as the
    request's ``max_tokens``, if fewer), then a finish chunk, the usage chunk and
    ``[DONE]`` (chunked transfer encoding, keep-alive). Each stream is a
    protocol object and a chain of ``call_later`` timers on uvloop, with every chunk
    encoded once at start-up: no task, no parsing, no encoding per chunk. Thousands of
    streams at ten chunks a second cost it a few percent of a core.

``python -m tests.benchmarks.stream_ends client URL STREAMS RAMP DEADLINE TOKENS_FILE [CAP]``

    Opens ``STREAMS`` connections, one every ``RAMP / STREAMS`` seconds, each posting
    one streamed chat completion (a fresh connection per stream, as separate users'
    clients would), and prints one JSON line: per stream its status, time to the first
    event, the gaps between events, whether it ended with ``[DONE]``, and an error if
    any. A stream still open at ``DEADLINE`` seconds after the first start is cut and
    counted as not finished. Protocol callbacks only (no coroutine per stream), so one
    process reads tens of thousands of events a second.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

MODEL = "up-stream"
PROMPT_TOKENS = 12


def raise_fd_limit() -> None:
    """Every stream holds a socket at each end: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _chunk(payload: bytes) -> bytes:
    """One chunk of the chunked transfer encoding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return _chunk(f"data: {text}\n\n".encode())


def _delta(content: str | None, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {} if content is None else {"content": content},
              "finish_reason": finish}  # fmt: skip
    return {"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1,
            "model": MODEL, "choices": [choice]}  # fmt: skip


# -- the upstream ----------------------------------------------------------------------


#: The streamed text, a chunk (and a token) each, in turn.
WORDS = (" the", " answer", " is", " on", " its", " way", " now")


class Upstream(asyncio.Protocol):
    """One connection: read a request, stream the answer on timers, then the next."""

    HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip

    def __init__(self, interval: float, chunks: int) -> None:
        self.interval, self.chunks = interval, chunks
        self.buffer = b""
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.sent = 0
        first = _event({**_delta(None), "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": "tok"}, "finish_reason": None}]})  # fmt: skip
        self.first = first
        # Words in turn, never the same chunk twice in a row: a real model's text. A
        # proxy may guard against a stuck model (LiteLLM fails a stream after 100
        # identical chunks in a row).
        self.words = [_event(_delta(word)) for word in WORDS]
        self.limit = chunks

    def ending(self) -> bytes:
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": self.limit,
                 "total_tokens": PROMPT_TOKENS + self.limit}  # fmt: skip
        return (_event(_delta(None, "stop"))
                + _event({**_delta(None), "choices": [], "usage": usage})
                + _event("[DONE]") + b"0\r\n\r\n")  # fmt: skip

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        self.buffer, raw = rest[length:], rest[:length]
        if not raw:  # not a completion (a peer's probe): a 404, and the next request
            print(f"upstream: no body: {head.split(b' HTTP/')[0][:80]!r}", file=sys.stderr)
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        body = json.loads(raw)
        # A small cap makes a short stream (the bench's warm-up); else the full length.
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or self.chunks
        self.limit = min(self.chunks, cap)
        self.sent = 1
        self.transport.write(self.HEAD + self.first)
        self.timer = asyncio.get_running_loop().call_later(self.interval, self.tick)

    def tick(self) -> None:
        if self.transport.is_closing():
            return
        if self.sent < self.limit:
            self.sent += 1
            self.transport.write(self.words[self.sent % len(self.words)])
            self.timer = asyncio.get_running_loop().call_later(self.interval, self.tick)
        else:
            self.timer = None
            self.transport.write(self.ending())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


async def serve_upstream(port: int, interval: float, length: float) -> None:
    chunks = max(1, round(length / interval))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Upstream(interval, chunks), "127.0.0.1", port, backlog=4096
    )
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


# -- the client ------------------------------------------------------------------------


class Stream(asyncio.Protocol):
    """One streamed call: send the request, time each event as it arrives."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request, self.done = request, done
        self.started = time.perf_counter()
        self.status = 0
        self.head = b""
        self.first: float | None = None
        self.last_event = 0.0
        self.gaps: list[float] = []
        self.events = 0
        self.tail = b""
        self.finished = False
        self.error: str | None = None
        self.transport: Any = None
        self.at = 0.0  # seconds from the client's start to this stream's

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self.head += data
            head, sep, data = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split(b" ", 2)[1])
            if self.status != 200:
                self.error = f"HTTP {self.status}: {data[:200]!r}"
                self.transport.close()
                return
        seen = (self.tail + data).count(b"data: ")  # the tail: a marker split across reads
        self.tail = data[-5:]
        if seen:
            if self.first is None:
                self.first = now - self.started
            else:
                self.gaps.append(now - self.last_event)
            self.last_event = now
            self.events += seen
        if b'"error"' in data:
            self.error = f"error event: {data[:200]!r}"
        if b"[DONE]" in data:
            self.finished = True
        if data.endswith(b"0\r\n\r\n"):
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished and self.error is None:
            self.error = f"closed before [DONE] ({exc})"
        if not self.done.done():
            self.done.set_result(None)

    def report(self) -> dict[str, Any]:
        return {"status": self.status, "ttft": self.first, "gaps": self.gaps, "at": self.at,
                "events": self.events, "finished": self.finished, "error": self.error}  # fmt: skip


def _request(url: str, path: str, token: str | None, body: bytes) -> bytes:
    host = urlsplit(url).netloc
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def run_client(
    url: str, streams: int, ramp: float, deadline: float, tokens: list[str], cap: int
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    path = parts.path.rstrip("/") + "/chat/completions"
    ask = [{"role": "user", "content": "a long answer, please"}]
    body = json.dumps({"model": MODEL, "max_tokens": cap, "stream": True, "messages": ask}).encode()
    loop = asyncio.get_running_loop()
    made: list[Stream] = []
    failed: list[dict[str, Any]] = []
    began = time.perf_counter()
    cpu = time.process_time()

    async def one(n: int) -> None:
        await asyncio.sleep(max(0.0, began + ramp * n / streams - time.perf_counter()))
        done = loop.create_future()
        request = _request(url, path, tokens[n % len(tokens)] if tokens else None, body)
        stream = Stream(request, done)
        stream.at = stream.started - began
        made.append(stream)
        try:
            await loop.create_connection(lambda: stream, host, port)
        except OSError as exc:
            failed.append({"status": 0, "ttft": None, "gaps": [], "events": 0,
                           "finished": False, "error": f"connect: {exc}"})  # fmt: skip
            made.remove(stream)
            return
        await done

    tasks = [asyncio.ensure_future(one(n)) for n in range(streams)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    for stream in made:
        if not stream.done.done():
            stream.error = stream.error or "cut at the deadline"
            if stream.transport is not None:
                stream.transport.abort()
    wall = time.perf_counter() - began
    reports = [stream.report() for stream in made] + failed
    return {"streams": reports, "wall": wall, "cpu": time.process_time() - cpu}


def main(argv: list[str]) -> None:
    import uvloop

    raise_fd_limit()
    role = argv[0]
    if role == "upstream":
        port, interval, length = int(argv[1]), float(argv[2]), float(argv[3])
        uvloop.run(serve_upstream(port, interval, length))
    else:
        url, streams, ramp, deadline = argv[1], int(argv[2]), float(argv[3]), float(argv[4])
        with open(argv[5]) as listing:
            tokens = listing.read().split()
        cap = int(argv[6]) if len(argv) > 6 else 4096
        result = uvloop.run(run_client(url, streams, ramp, deadline, tokens, cap))
        json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
