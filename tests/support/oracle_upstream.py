"""An OpenAI-compatible upstream that bills like OpenAI: a real HTTP server on a free port.

It serves ``/chat/completions``, ``/responses`` (every call writes its whole
``max_output_tokens``), ``/embeddings`` (each input's exact tokens) and Anthropic's
``/messages`` (the whole ``max_tokens``; the prompt by ``billing.claude_prompt_tokens``).

Every call is billed by ``llm_quota.testing.billing`` (written apart from the estimator):
each billed part of the body at OpenAI's published rules, images at their real size, and
every choice writing its whole cap. Usage is reported exactly, in completions and in the
final chunk of a stream. What OpenAI refuses (``max_tokens`` to a reasoning model, a
prompt over the context window, an image it cannot read) gets OpenAI's 400.

``media`` holds what a body only points at (remote images' sizes, uploaded files);
``bills`` records each call's body and usage, ``billed_at`` when (``time.time()``, the
same index), ``refusals`` each refused body.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llm_quota.testing import billing


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: OracleServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if self.path.endswith("/embeddings"):
            self._embeddings(body)
            return
        if self.path.endswith("/responses"):
            self._responses(body)
            return
        if self.path.endswith("/messages"):
            self._messages(body)
            return
        try:
            bill = billing.bill(body, self.server.media)
        except billing.Refused as refused:
            self.server.record(body, None)
            self._json(400, {"error": refused.error()})
            return
        self.server.record(body, bill.usage())
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text},
             "finish_reason": "length"}
            for i, text in enumerate(bill.texts)
        ]  # fmt: skip
        base = {"id": "chatcmpl-oracle", "created": 1, "model": body.get("model")}
        if not body.get("stream"):
            self._json(200, {**base, "object": "chat.completion", "choices": choices,
                             "usage": bill.usage()})  # fmt: skip
            return
        self._stream(body, base, bill)

    def _embeddings(self, body: dict[str, Any]) -> None:
        try:
            tokens = billing.embedding_tokens(body)
        except billing.Refused as refused:
            self.server.record(body, None)
            self._json(400, {"error": refused.error()})
            return
        answer = billing.embeddings_answer(body, tokens)
        self.server.record(body, answer["usage"])
        self._json(200, answer)

    def _responses(self, body: dict[str, Any]) -> None:
        try:
            bill = billing.bill_response(body, self.server.media)
        except billing.Refused as refused:
            self.server.record(body, None)
            self._json(400, {"error": refused.error()})
            return
        usage = billing.response_usage(bill)
        self.server.record(body, usage)
        text = bill.texts[0]
        message = {"type": "message", "id": "msg_oracle", "status": "completed",
                   "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response = {"id": "resp_oracle", "object": "response", "created_at": 1,
                    "status": "incomplete", "model": body.get("model"),
                    "incomplete_details": {"reason": "max_output_tokens"},
                    "output": [message], "usage": usage}  # fmt: skip
        if not body.get("stream"):
            self._json(200, response)
            return
        self._start_stream()
        self._named({"type": "response.created", "sequence_number": 0,
                     "response": {**response, "status": "in_progress", "output": [],
                                  "usage": None}})  # fmt: skip
        for number, start in enumerate(range(0, len(text), 400), 1):
            self._named({"type": "response.output_text.delta", "sequence_number": number,
                         "item_id": "msg_oracle", "output_index": 0, "content_index": 0,
                         "delta": text[start : start + 400], "logprobs": []})  # fmt: skip
        self._named({"type": "response.incomplete", "sequence_number": 10**6,
                     "response": response})  # fmt: skip
        self.wfile.write(b"0\r\n\r\n")

    def _messages(self, body: dict[str, Any]) -> None:
        """Anthropic's bill, as the oracle reads it (``billing.claude_usage``): the whole
        ``max_tokens`` written, half of it thinking when thinking is on, and the whole
        prompt written to the cache at its longest TTL when the body asks for caching."""
        cap = int(body.get("max_tokens") or 0)
        thinking = cap // 2 if (body.get("thinking") or {}).get("type") == "enabled" else 0
        usage = billing.claude_usage(body, cap)  # a body asking for caching: all written
        self.server.record(body, usage)
        text = "".join(" tok" if i else "tok" for i in range(cap - thinking))
        message = billing.message_object(body, text, usage, "max_tokens")
        if not body.get("stream"):
            self._json(200, message)
            return
        self._start_stream()
        for event in billing.message_events(message, [text[i : i + 400]
                                                      for i in range(0, len(text), 400)]):
            self._named(event)
        self.wfile.write(b"0\r\n\r\n")

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _named(self, data: dict[str, Any]) -> None:
        self._write(f"event: {data['type']}\ndata: {json.dumps(data)}\n\n")

    def _stream(self, body: dict[str, Any], base: dict[str, Any], bill: billing.Bill) -> None:
        self._start_stream()
        chunk = {**base, "object": "chat.completion.chunk"}
        for index, text in enumerate(bill.texts):
            for start in range(0, len(text), 400):
                delta = {"content": text[start : start + 400]}
                self._event({**chunk, "choices": [{"index": index, "delta": delta}]})
            self._event({**chunk, "choices": [{"index": index, "delta": {},
                                               "finish_reason": "length"}]})  # fmt: skip
        if (body.get("stream_options") or {}).get("include_usage"):
            self._event({**chunk, "choices": [], "usage": bill.usage()})
        self._write("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _event(self, data: dict[str, Any]) -> None:
        self._write(f"data: {json.dumps(data)}\n\n")

    def _write(self, text: str) -> None:
        payload = text.encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")

    def _json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class OracleServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of 64 connections must not wait for SYN retries

    def __init__(self, media: billing.Media | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.media = media or billing.Media()
        self.bills: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.billed_at: list[float] = []
        self.refusals: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection the gateway cut: expected in some tests, not news

    def record(self, body: dict[str, Any], usage: dict[str, Any] | None) -> None:
        with self._lock:
            if usage is None:
                self.refusals.append(body)
            else:
                self.bills.append((body, usage))
                self.billed_at.append(time.time())

    def start(self) -> OracleServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
