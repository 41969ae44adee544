"""An upstream with no network, offline and deterministic: the demo's and the tests' choice.

The gateway never falls back on it by itself: a project opts in with
``LLM_QUOTA["UPSTREAM"] = "llm_quota.testing.FakeProvider"`` (the demo does when
``OPENAI_BASE_URL`` is unset).

It answers Chat Completions like OpenAI does (bodies, SSE chunks, the final usage
chunk, ``finish_reason: "length"`` at the cap), the Responses API (the same replies,
as a ``response`` object or its typed events ending with ``response.completed``) and
Embeddings (small deterministic vectors, usage counted exactly) and Anthropic's
Messages API (a ``message``, or its events from ``message_start`` to ``message_stop``),
so the demo and the tests exercise
the real gateway path without a network. The same request always gets the same
reply; its length depends on the prompt and never exceeds the ``max_tokens`` sent.
Token counts are real: the prompt is billed as OpenAI bills it (``llm_quota.testing.billing``:
every billed field, images by their size), the reply counted with the model's tiktoken
encoding (or its offline stand-in).

The async calls (``acomplete``, ``astream``) give the same replies, computed in a
thread (counting tokens is CPU work that would stall the event loop), then streamed
one chunk per turn of the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from asgiref.sync import sync_to_async

from llm_quota.gateway.upstream import UpstreamError
from llm_quota.rules.estimation import count_output
from llm_quota.shapes import embeddings, messages, responses
from llm_quota.shapes.chat import CAP_FIELDS, DONE
from llm_quota.shapes.chat import PATH as CHAT_PATH
from llm_quota.testing import billing
from llm_quota.testing.billing import Media, prompt_tokens

FINGERPRINT = "fp_llmq_fake"
#: The reply's natural length is between these many tokens, then cut at the cap.
SHORTEST, LONGEST = 24, 96
WORDS = (
    "quota token budget reserve settle release window minute month limit tier model "
    "price estimate prompt output stream usage ledger redis atomic lua script gate "
    "request response header retry upgrade worker loop spend cost base multiplier "
    "sliding calendar period clamp cap answer deterministic offline fake provider"
).split()


def _seed(body: dict[str, Any], choice: int) -> int:
    material = json.dumps([body.get("model"), body.get("messages"), choice], sort_keys=True,
                          default=str)  # fmt: skip
    return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big")


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return " ".join(str(content or "").split())[:80]
    return ""


def _pieces(body: dict[str, Any], choice: int) -> tuple[list[str], int]:
    """The reply as streamable pieces, and its natural length in tokens."""
    seed = _seed(body, choice)
    rng = random.Random(seed)
    asked = _last_user_text(body.get("messages"))
    opening = f'Fake reply from {body.get("model")}. You said: "{asked}".'
    pieces = [word if i == 0 else f" {word}" for i, word in enumerate(opening.split(" "))]
    pieces += [f" {rng.choice(WORDS)}" for _ in range(LONGEST * 2)]
    return pieces, SHORTEST + seed % (LONGEST - SHORTEST + 1)


def _cap(body: dict[str, Any]) -> int:
    caps = [body[name] for name in CAP_FIELDS if isinstance(body.get(name), int)]
    return max(1, min(caps)) if caps else LONGEST


def reply(body: dict[str, Any], choice: int = 0) -> tuple[list[str], str]:
    """The pieces of one choice's text, cut to fit, and its ``finish_reason``."""
    model = str(body.get("model"))
    pieces, natural = _pieces(body, choice)
    cap = _cap(body)
    target = min(natural, cap)
    taken: list[str] = []
    for piece in pieces:
        if count_output("".join(taken) + piece, model) > target:
            break
        taken.append(piece)
    return taken, "length" if cap < natural else "stop"


def _usage(body: dict[str, Any], texts: list[str]) -> dict[str, int]:
    model = str(body.get("model"))
    # A demo has no remote images or uploaded files to look at: ``lenient`` bills them
    # as a plain image and an empty file.
    prompt = prompt_tokens(body, Media(lenient=True))
    completion = sum(count_output(text, model) for text in texts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _id(body: dict[str, Any]) -> str:
    return "chatcmpl-fake" + hashlib.sha256(str(_seed(body, -1)).encode()).hexdigest()[:24]


class FakeStream:
    """The chunks of a streamed reply, as JSON payloads: ``for``, or ``async for``."""

    def __init__(self, chunks: Iterator[dict[str, Any]], done: str | None = DONE) -> None:
        self._chunks = chunks
        self._done = done

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:
            yield json.dumps(chunk, separators=(",", ":"))
        if self._done is not None:
            yield self._done  # as OpenAI ends a chat stream: else the gateway reports a cut-off

    async def __aiter__(self) -> AsyncIterator[str]:
        # Built in a thread, then handed out one per turn of the loop, as a real
        # upstream's arrive.
        payloads = await sync_to_async(lambda: list(self), thread_sensitive=False)()
        for data in payloads:
            await asyncio.sleep(0)
            yield data

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        try:
            self.close()
        except ValueError:
            pass  # still being built in its thread (the client left early): it ends there


def _as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses body as the chat body it replies to (same prompt, same cap)."""
    return {
        "model": body.get("model"),
        "messages": billing.response_messages(body),
        "max_tokens": body.get(responses.CAP_FIELD),
    }


def _response(body: dict[str, Any]) -> dict[str, Any]:
    chat = _as_chat(body)
    pieces, finish = reply(chat)
    text = "".join(pieces)
    prompt = prompt_tokens(chat, Media(lenient=True))
    output = count_output(text, str(body.get("model")))
    cut = finish == "length"
    message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
    return {
        "id": "resp_fake" + _id(chat)[len("chatcmpl-fake") :],
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "model": body.get("model"),
        "output": [message],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        },
    }


def _response_events(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    final = _response(body)
    pieces, _finish = reply(_as_chat(body))
    number = 0

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal number
        number += 1
        return {"type": kind, "sequence_number": number, **fields}

    yield event("response.created", response={**final, "status": "in_progress", "output": [],
                                               "usage": None})  # fmt: skip
    for piece in pieces:
        yield event("response.output_text.delta", item_id="msg_fake", output_index=0,
                    content_index=0, delta=piece, logprobs=[])  # fmt: skip
    yield event(f"response.{final['status']}", response=final)


def _message(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An Anthropic ``message`` answering a Messages body, and its text's pieces."""
    chat = {"model": body.get("model"), "messages": body.get("messages"),
            "max_tokens": body.get(messages.CAP_FIELD)}  # fmt: skip
    pieces, finish = reply(chat)
    text = "".join(pieces)
    usage = {"input_tokens": billing.claude_prompt_tokens(body),
             "output_tokens": count_output(text, str(body.get("model"))),
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}  # fmt: skip
    stop = "max_tokens" if finish == "length" else "end_turn"
    return billing.message_object(body, text, usage, stop), pieces


class FakeProvider:
    """An upstream with no network (see the module docstring)."""

    def complete(self, body: dict[str, Any], path: str = CHAT_PATH) -> dict[str, Any]:
        if path == embeddings.PATH:
            try:
                tokens = billing.embedding_tokens(body)
            except billing.Refused as refused:  # OpenAI's 400, as OpenAI sends it
                raise UpstreamError(400, refused.message, code="upstream_error",
                                    error=refused.error()) from None  # fmt: skip
            return billing.embeddings_answer(body, tokens)
        if path == responses.PATH:
            return _response(body)
        if path == messages.PATH:
            return _message(body)[0]
        choices, texts = [], []
        for index in range(int(body.get("n") or 1)):
            pieces, finish = reply(body, index)
            text = "".join(pieces)
            texts.append(text)
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            })  # fmt: skip
        return {
            "id": _id(body),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": _usage(body, texts),
        }

    def stream(self, body: dict[str, Any], path: str = CHAT_PATH) -> FakeStream:
        if path == responses.PATH:
            return FakeStream(_response_events(body), done=None)
        if path == messages.PATH:
            events = billing.message_events(*_message(body))
            return FakeStream((event for event in events), done=None)
        return FakeStream(self._chunks(body))

    async def acomplete(self, body: dict[str, Any], path: str = CHAT_PATH) -> dict[str, Any]:
        return await sync_to_async(self.complete, thread_sensitive=False)(body, path)

    async def astream(self, body: dict[str, Any], path: str = CHAT_PATH) -> FakeStream:
        return self.stream(body, path)

    def _chunks(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": _id(body),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": FINGERPRINT,
        }
        if include_usage:
            base["usage"] = None

        def chunk(index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        texts = []
        for index in range(int(body.get("n") or 1)):
            pieces, finish = reply(body, index)
            texts.append("".join(pieces))
            yield chunk(index, {"role": "assistant", "content": ""}, None)
            for piece in pieces:
                yield chunk(index, {"content": piece}, None)
            yield chunk(index, {}, finish)
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(body, texts)}
