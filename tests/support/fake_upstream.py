"""The tests' own OpenAI-compatible upstream: a real HTTP server on a free loopback port.

The model name picks the behaviour, so one server serves every case:

- ``up-normal``: a completion of ``WORDS`` words (one token each), cut at the
  ``max_tokens`` it was sent, with a ``usage`` block (prompt tokens: ``PROMPT``);
- ``up-slow``: the same after ``LATENCY`` seconds (and ``LATENCY`` between stream chunks);
- ``up-500``: HTTP 500 with an OpenAI error body;
- ``up-429``: HTTP 429 (the upstream's own rate limit) with ``Retry-After: 2``;
- ``up-no-usage``: no ``usage`` block, in completions and in streams;
- ``up-ignores-cap``: ``EXTRA`` more tokens than the ``max_tokens`` it was sent;
- ``up-usage-*`` (``BAD_USAGE``): ``up-normal``'s answer with a broken ``usage``
  (zero, negative, strings, fractions, NaN and Infinity, ``1e20``);
- ``up-drop``: streams ``DROP_AFTER`` chunks, then resets the connection;
- ``up-truncate``: streams ``DROP_AFTER`` chunks, then ends the response cleanly (the
  last chunk of the chunked encoding) with no finish, no usage and no ``[DONE]``;
- ``up-trickle``: streams up to ``WORDS`` chunks ``TRICKLE`` seconds apart (for clients
  that disconnect), recording how many it managed to send;
- ``up-hold``: streams one chunk, then waits until the test sets ``hold`` (so that every
  request of a burst is admitted or refused before any of them is settled);
- ``up-long``: an answer that takes ``LONG`` seconds: sent whole
  after it, or streamed as chunks spread over it (calls that outlive a lease).

Every request body is recorded in ``requests``; streams are sent with chunked transfer
encoding, as OpenAI does, so a dropped connection is an error and not an early end.

``/responses`` behaves the same way in the Responses API's shape: a ``response`` object,
or typed events (``response.output_text.delta`` per word) ending with
``response.completed``, where ``up-truncate``/``up-drop`` stop before it and
``up-no-usage`` sends it without ``usage``. ``/messages`` likewise in Anthropic's shape:
a ``message``, or ``message_start`` … ``content_block_delta`` per word …
``message_delta`` (the output count), ``message_stop``.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.ports import spare_port

WORDS = 40
PROMPT = 11
EXTRA = 25
LATENCY = 0.3
TRICKLE = 0.05
DROP_AFTER = 3
LONG = 6.0
#: The longest ``up-hold`` waits for the test (a failed test must not hang the server).
HOLD_LIMIT = 60


#: Models whose ``usage`` is broken the way upstreams have broken it (``NaN`` is JSON in
#: Python's reading; ``1e20`` broke the settle script). Where the output count is a
#: good one it is the answer's true count, as ``up-normal`` sends it for a cap of 20.
BAD_USAGE: dict[str, dict[str, Any]] = {
    "up-usage-zero": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    "up-usage-negative": {"prompt_tokens": -11, "completion_tokens": -20},
    "up-usage-string": {"prompt_tokens": "11", "completion_tokens": 20},
    "up-usage-fraction": {"prompt_tokens": 10.5, "completion_tokens": 20},
    "up-usage-nan": {"prompt_tokens": float("nan"), "completion_tokens": 20},
    "up-usage-huge": {"prompt_tokens": 1e20, "completion_tokens": 10**20},
    "up-usage-null": {"prompt_tokens": None, "completion_tokens": 20},
}


def word(i: int) -> str:
    return " tok" if i else "tok"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the
    # client's delayed ACK of the headers (40 ms on Linux): "up-slow" at 50 ms took 92.
    disable_nagle_algorithm = True
    server: UpstreamServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        self.server.record(body, self.headers.get("Authorization"))
        self.server.paths.append((self.path, dict(self.headers)))
        self.responses_api = self.path.endswith("/responses")
        self.messages_api = self.path.endswith("/messages")
        model = body.get("model", "")
        if model == "up-500":
            self._json(500, {"error": {"message": "upstream exploded", "type": "server_error",
                                       "code": None, "param": None}})  # fmt: skip
            return
        if model == "up-429":
            self._json(429, {"error": {"message": "upstream rate limit", "type": "requests",
                                       "code": "rate_limit_exceeded", "param": None}},
                       headers={"Retry-After": "2"})  # fmt: skip
            return
        if model == "up-slow":
            time.sleep(LATENCY)
        if model == "up-long" and not body.get("stream"):
            time.sleep(LONG)
        cap = (
            body.get("max_output_tokens") or body.get("max_completion_tokens")
            or body.get("max_tokens") or WORDS
        )  # fmt: skip
        count = min(WORDS, cap) + (EXTRA if model == "up-ignores-cap" else 0)
        if body.get("stream"):
            self._stream(body, model, count)
            return
        text = "".join(word(i) for i in range(count))
        if self.responses_api:
            self._json(200, response_object(model, text, count))
            return
        if self.messages_api:
            self._json(200, message_object(model, text, count))
            return
        reply: dict[str, Any] = {
            "id": "chatcmpl-up",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if count >= cap else "stop"}],
        }  # fmt: skip
        if model != "up-no-usage":
            reply["usage"] = BAD_USAGE.get(model) or usage(count)
        self._json(200, reply)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _event(self, data: dict[str, Any]) -> None:
        """One named event, as the Responses API sends them."""
        self._chunk(json.dumps(data), name=data["type"])

    def _chunk(self, data: str, name: str | None = None) -> None:
        head = f"event: {name}\n" if name else ""
        payload = f"{head}data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _stream(self, body: dict[str, Any], model: str, count: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                "model": model}  # fmt: skip
        sent = 0
        if self.messages_api:
            start = {**message_object(model, "", count), "content": [], "stop_reason": None}
            if model != "up-no-usage":
                start["usage"] = {"input_tokens": PROMPT, "output_tokens": 1}
            self._event({"type": "message_start", "message": start})
            self._event({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}})  # fmt: skip
        try:
            for i in range(count):
                if model == "up-drop" and i == DROP_AFTER:
                    # An abortive close (RST): the upstream died mid-answer.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.server.sent[model] = sent
                    self.close_connection = True
                    self.connection.close()
                    return
                if model == "up-truncate" and i == DROP_AFTER:
                    self.wfile.write(b"0\r\n\r\n")  # a well-formed end, mid-answer
                    return
                if model in ("up-slow", "up-trickle") and i:
                    time.sleep(TRICKLE if model == "up-trickle" else LATENCY / 10)
                if model == "up-long":
                    time.sleep(LONG / count)
                if model == "up-hold" and i == 1:
                    self.server.hold.wait(HOLD_LIMIT)
                if self.messages_api:
                    self._event({"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": word(i)}})  # fmt: skip
                elif self.responses_api:
                    self._event({"type": "response.output_text.delta", "item_id": "msg_up",
                                 "output_index": 0, "content_index": 0, "delta": word(i),
                                 "sequence_number": i + 1})  # fmt: skip
                else:
                    choice = {"index": 0, "delta": {"content": word(i)}, "finish_reason": None}
                    self._chunk(json.dumps({**base, "choices": [choice]}))
                sent += 1
                self.server.sent[model] = sent
            if self.messages_api:
                self._event({"type": "content_block_stop", "index": 0})
                delta: dict[str, Any] = {"type": "message_delta",
                                         "delta": {"stop_reason": "max_tokens"}}  # fmt: skip
                if model != "up-no-usage":
                    delta["usage"] = {"output_tokens": count}
                self._event(delta)
                self._event({"type": "message_stop"})
                self.wfile.write(b"0\r\n\r\n")
                return
            if self.responses_api:
                text = "".join(word(i) for i in range(count))
                self._event({"type": "response.completed", "sequence_number": count + 1,
                             "response": response_object(model, text, count)})  # fmt: skip
                self.wfile.write(b"0\r\n\r\n")
                return
            include = (body.get("stream_options") or {}).get("include_usage")
            self._chunk(json.dumps({**base, "choices": [{"index": 0, "delta": {},
                                                         "finish_reason": "length"}]}))  # fmt: skip
            if include and model != "up-no-usage":
                reported = BAD_USAGE.get(model) or usage(count)
                self._chunk(json.dumps({**base, "choices": [], "usage": reported}))
            self._chunk("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.server.sent[model] = sent  # the gateway hung up on us
            self.close_connection = True


def response_object(model: str, text: str, count: int) -> dict[str, Any]:
    """A Responses API ``response`` of ``text`` (``count`` tokens), usage as ``usage``."""
    response: dict[str, Any] = {
        "id": "resp_up", "object": "response", "created_at": 1, "status": "completed",
        "model": model,
        "output": [{"type": "message", "id": "msg_up", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
    }  # fmt: skip
    if model != "up-no-usage":
        reported = BAD_USAGE.get(model) or usage(count)
        response["usage"] = {
            "input_tokens": reported.get("prompt_tokens"),
            "output_tokens": reported.get("completion_tokens"),
            "total_tokens": reported.get("total_tokens"),
        }
    return response


def message_object(model: str, text: str, count: int) -> dict[str, Any]:
    """An Anthropic ``message`` of ``text`` (``count`` tokens)."""
    message: dict[str, Any] = {
        "id": "msg_up", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens",
        "stop_sequence": None,
    }  # fmt: skip
    if model != "up-no-usage":
        message["usage"] = {"input_tokens": PROMPT, "output_tokens": count}
    return message


def usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT, "completion_tokens": completion,
            "total_tokens": PROMPT + completion}  # fmt: skip


class UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of 64 connections must not wait for SYN retries

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", spare_port()), Handler)
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        #: Each request's path and headers.
        self.paths: list[tuple[str, dict[str, str]]] = []
        self.sent: dict[str, int] = {}
        self.hold = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection the gateway (or the test) cut: expected here, not news

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def record(self, body: dict[str, Any], authorization: str | None) -> None:
        with self._lock:
            self.requests.append(body)
            self.authorizations.append(authorization)

    def start(self) -> UpstreamServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
