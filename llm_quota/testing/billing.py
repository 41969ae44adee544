"""What OpenAI bills for a Chat Completions request: the tests' oracle and the demo's fake.

Written apart from the estimator (``llm_quota.rules.estimation`` and ``rules.vision``),
straight from OpenAI's published rules, so a test that compares the two compares two
readings of the rules, not one with itself. Where OpenAI does not publish how a part
reaches the model (a function, a schema), the harshest published reading is billed, so
an estimate that bounds this bill bounds the real provider's too:

- messages: the cookbook's formula ("How to count tokens with tiktoken"): 3 tokens per
  message, the tokens of each value, 1 more for a ``name``, 3 to prime the reply. Text
  parts by their text; images by the vision guide's rules ("Images and vision >
  Calculating costs") on their real size; audio at 10 tokens a second of its real
  duration (Realtime guide, "Managing costs": user audio is 1 token per 100 ms); files
  by their bytes read as text plus a high-detail image per PDF page. Every media part
  adds ``MEDIA_PART_TOKENS`` of markers. Any other value: its JSON text.
- ``tools`` and ``functions``: the largest of the cookbook's function formula (its
  harsher constants), the TypeScript-like namespace the models are shown (as in
  openai/harmony), and the JSON text.
- ``response_format``: the larger of its JSON text and its schema as a TypeScript type.
- ``tool_choice``: its JSON text.
- output: the whole cap sent (``max_completion_tokens``, else ``max_tokens``) for each of
  the ``n`` choices; a reasoning model spends half of it on reasoning.

It refuses what OpenAI refuses, with OpenAI's 400: ``max_tokens`` sent to a reasoning
model (``unsupported_parameter``), a prompt plus cap over the context window
(``context_length_exceeded``), an image, audio or file it cannot read or find.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_quota.rules.estimation import encoding_name_for, load_encoding

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
MEDIA_PART_TOKENS = 4
#: The cookbook's function formula, with its harsher (gpt-4/gpt-3.5) constants.
FUNC_INIT, PROP_INIT, PROP_KEY, ENUM_INIT, ENUM_ITEM, FUNC_END = 10, 3, 3, -3, 3, 12
#: Realtime guide: "Audio tokens in user messages are 1 token per 100 ms of audio".
AUDIO_TOKENS_PER_SECOND = 10
#: A PDF page reaches the model as text and as an image of the page (letter, 150 dpi).
PAGE_SIZE = (1275, 1650)
DEFAULT_OUTPUT = 4096

#: The vision guide's tables: tile models (base, per 512px tile), patch models (multiplier).
TILE_MODELS = {
    "gpt-5": (70, 140), "gpt-5-chat-latest": (70, 140),
    "gpt-4o": (85, 170), "gpt-4.1": (85, 170), "gpt-4.5": (85, 170), "gpt-4.5-preview": (85, 170),
    "gpt-4o-mini": (2833, 5667),
    "o1": (75, 150), "o1-pro": (75, 150), "o3": (75, 150),
}  # fmt: skip
PATCH_MODELS = {
    "gpt-5-mini": 1.62, "gpt-5-nano": 2.46, "gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46,
    "o4-mini": 1.72,
}  # fmt: skip
#: Every model has a window: one the tables don't name is refused past this (the
#: tests give such a model's price row the same window).
DEFAULT_CONTEXT_WINDOW = 128_000
CONTEXT_WINDOWS = {
    "gpt-4o": 128_000, "gpt-4o-mini": 128_000, "gpt-4.1": 1_047_576, "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576, "gpt-5": 400_000, "gpt-5-mini": 400_000, "gpt-5-nano": 400_000,
    "o1": 200_000, "o3": 200_000, "o4-mini": 200_000,
}  # fmt: skip
#: Models that take ``max_completion_tokens`` only: the o-series and the gpt-5 family.
REASONING = re.compile(r"^(o\d|gpt-5)")
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class Refused(Exception):
    """What OpenAI answers with a 400: the message, the ``code`` and the ``param``."""

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param

    def error(self) -> dict[str, Any]:
        return {
            "message": self.message, "type": "invalid_request_error",
            "code": self.code, "param": self.param,
        }  # fmt: skip


@dataclass
class Media:
    """Where the oracle finds what a body only points at: the size of each remote image
    (OpenAI fetches it), and the bytes of each uploaded file. ``lenient`` bills what it
    cannot find as a plain 1024x1024 image or an empty file (the demo's fake provider)."""

    images: dict[str, tuple[int, int]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    lenient: bool = False

    def image_size(self, url: str, param: str) -> tuple[int, int]:
        if url.startswith("data:"):
            size = image_size(_data_url_bytes(url))
        else:
            size = self.images.get(url) or ((1024, 1024) if self.lenient else None)
        if size is None or min(size) < 1:
            if self.lenient:
                return (1024, 1024)
            raise Refused("Invalid image: it could not be read.", code="invalid_image", param=param)
        return size

    def file(self, part: Mapping[str, Any], param: str) -> bytes:
        if isinstance(part.get("file_data"), str):
            return _data_url_bytes(part["file_data"])
        found = self.files.get(str(part.get("file_id")))
        if found is None and not self.lenient:
            raise Refused("No such file.", code="invalid_file", param=param)
        return found or b""


@dataclass(frozen=True)
class Bill:
    """One call's usage, as OpenAI reports it, and the text of each choice."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    texts: list[str]

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


def family(model: str) -> str:
    """The model's name without a snapshot date (``gpt-4o-2024-08-06`` is ``gpt-4o``)."""
    return _DATED.sub("", model)


def is_reasoning(model: str) -> bool:
    return bool(REASONING.match(model))


def output_cap(body: Mapping[str, Any]) -> int:
    """What the call may write per choice: the cap sent, as OpenAI reads it."""
    for name in ("max_completion_tokens", "max_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body.get(name), bool):
            return body[name]
    return DEFAULT_OUTPUT


def bill(body: Mapping[str, Any], media: Media | None = None) -> Bill:
    """The whole call: the prompt, and every choice writing its whole cap."""
    model = str(body.get("model"))
    if is_reasoning(family(model)) and body.get("max_tokens") is not None:
        raise Refused(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            code="unsupported_parameter", param="max_tokens",
        )  # fmt: skip
    prompt = prompt_tokens(body, media)
    cap = output_cap(body)
    window = CONTEXT_WINDOWS.get(family(model), DEFAULT_CONTEXT_WINDOW)
    if prompt + cap > window:
        raise Refused(
            f"This model's maximum context length is {window} tokens. However, you "
            f"requested {prompt + cap} tokens ({prompt} in the messages, {cap} in the "
            "completion).",
            code="context_length_exceeded", param="messages",
        )  # fmt: skip
    n = body.get("n")
    choices = n if isinstance(n, int) else 1
    reasoning = cap // 2 if is_reasoning(family(model)) else 0
    text = "".join(" tok" if i else "tok" for i in range(cap - reasoning))
    return Bill(prompt, cap * choices, reasoning * choices, [text] * choices)


def prompt_tokens(body: Mapping[str, Any], media: Media | None = None) -> int:
    """What OpenAI bills as input for ``body`` (see the module docstring)."""
    media = media or Media()
    model = str(body.get("model"))
    count = _counter(model)
    total = _messages(body.get("messages"), model, count, media)
    for name in ("tools", "functions"):
        if body.get(name):
            total += _functions(body[name], count)
    if body.get("response_format") is not None:
        total += _response_format(body["response_format"], count)
    if body.get("tool_choice") is not None:
        total += count(_json(body["tool_choice"]))
    return total


# -- text ----------------------------------------------------------------------------------


def _counter(model: str) -> Callable[[str], int]:
    encoding = load_encoding(encoding_name_for(model))

    def count(text: str) -> int:
        if encoding is None:
            return len(text.encode("utf-8", "surrogatepass"))
        try:
            return len(encoding.encode(text, disallowed_special=()))
        except Exception:
            return len(text.encode("utf-8", "surrogatepass"))

    return count


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


# -- messages ------------------------------------------------------------------------------


def _messages(messages: Any, model: str, count: Callable[[str], int], media: Media) -> int:
    total = REPLY_PRIMING
    for index, message in enumerate(messages or []):
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            total += count(_json(message))
            continue
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                total += sum(
                    _part(part, model, count, media, f"messages[{index}].content[{n}]")
                    for n, part in enumerate(value)
                )  # fmt: skip
            elif isinstance(value, str):
                total += count(value)
            elif value is not None:
                total += count(_json(value))
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def _part(part: Any, model: str, count: Callable[[str], int], media: Media, where: str) -> int:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return count(part["text"])
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return count(part["refusal"])
    if kind == "image_url" and isinstance(part.get("image_url"), dict):
        image = part["image_url"]
        size = media.image_size(str(image.get("url")), where)
        return MEDIA_PART_TOKENS + image_tokens(model, size, image.get("detail"))
    if kind == "input_audio" and isinstance(part.get("input_audio"), dict):
        return MEDIA_PART_TOKENS + _audio_tokens(part["input_audio"], where, media)
    if kind == "file" and isinstance(part.get("file"), dict):
        data = media.file(part["file"], where)
        pages = max(1, len(re.findall(rb"/Type\s*/Page(?!s)", data)))
        page = image_tokens(model, PAGE_SIZE, "high")
        return MEDIA_PART_TOKENS + count(data.decode("latin-1")) + pages * page
    return count(_json(part))


def _data_url_bytes(url: str) -> bytes:
    payload = url.split(",", 1)[1] if url.startswith("data:") else url
    try:
        return base64.b64decode("".join(payload.split()) + "==", validate=False)
    except (binascii.Error, ValueError):
        return b""


# -- images: the vision guide's rules ------------------------------------------------------


def image_tokens(model: str, size: tuple[int, int], detail: Any) -> int:
    """An image's tokens by the guide; a model it does not list pays the dearest rule."""
    name = family(model)
    if name in PATCH_MODELS:
        return _patches(*size, PATCH_MODELS[name])
    if name in TILE_MODELS:
        return _tiles(*size, *TILE_MODELS[name], detail)
    return max(
        [_patches(*size, m) for m in PATCH_MODELS.values()]
        + [_tiles(*size, *rates, detail) for rates in TILE_MODELS.values()]
    )


def _tiles(width: int, height: int, base: int, tile: int, detail: Any) -> int:
    """Fit in 2048x2048, then the shortest side to 768, then 512px tiles. Sizes are
    rounded to the nearest pixel at each step (what the API was seen to do)."""
    if detail == "low":
        return base
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = round(w * scale), round(h * scale)
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = round(w * scale), round(h * scale)
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


def _patches(width: int, height: int, multiplier: float) -> int:
    """32px patches, the image shrunk to at most 1536 of them, times the multiplier."""
    w, h = float(width), float(height)
    if math.ceil(w / 32) * math.ceil(h / 32) > 1536:
        r = math.sqrt(32 * 32 * 1536 / (w * h))
        r *= min(math.floor(w * r / 32) / (w * r / 32), math.floor(h * r / 32) / (h * r / 32))
        w, h = w * r, h * r
    patches = min(math.ceil(w / 32) * math.ceil(h / 32), 1536)
    return math.ceil(patches * multiplier)


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG file's bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 9 < len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    return None


# -- audio ---------------------------------------------------------------------------------


def _audio_tokens(audio: Mapping[str, Any], where: str, media: Media) -> int:
    data = _data_url_bytes(str(audio.get("data") or ""))
    seconds = wav_seconds(data) if audio.get("format") == "wav" else mp3_seconds(data)
    if seconds is None:
        if media.lenient:
            return 0
        raise Refused("The audio could not be decoded.", code="invalid_audio", param=where)
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)


def wav_seconds(data: bytes) -> float | None:
    """A WAV file's duration: its data chunk over the byte rate of its fmt chunk."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    at, byte_rate = 12, None
    while at + 8 <= len(data):
        kind, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        if kind == b"fmt ":
            byte_rate = struct.unpack("<I", data[at + 16 : at + 20])[0]
        elif kind == b"data":
            return size / byte_rate if byte_rate else None
        at += 8 + size + (size & 1)
    return None


#: MPEG-1 Layer III bitrates (kbps), by the header's 4-bit index; MPEG-2/2.5 (low rates).
_MP3_RATES = {3: [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320],
              2: [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160]}  # fmt: skip


def mp3_seconds(data: bytes) -> float | None:
    """A constant-bitrate MP3's duration: its size over the first frame's bitrate."""
    at = data.find(b"\xff")
    while 0 <= at < len(data) - 3:
        if data[at + 1] & 0xE0 == 0xE0:
            version = (data[at + 1] >> 3) & 3  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
            layer = (data[at + 1] >> 1) & 3  # 1: Layer III
            index = data[at + 2] >> 4
            if version != 1 and layer == 1 and 0 < index < 15:
                kbps = _MP3_RATES[3 if version == 3 else 2][index]
                return len(data) * 8 / (kbps * 1000)
        at = data.find(b"\xff", at + 1)
    return None


# -- functions and schemas -----------------------------------------------------------------


def _functions(value: Any, count: Callable[[str], int]) -> int:
    """The harshest of the cookbook's formula, the TypeScript namespace and the JSON."""
    functions = [_function(item) for item in value] if isinstance(value, list) else []
    readings = [count(_json(value))]
    complete = [f for f in functions if f is not None]
    if functions and len(complete) == len(functions):
        readings += [_cookbook(complete, count), count(_namespace(complete))]
    return max(readings)


def _function(item: Any) -> dict[str, Any] | None:
    """A ``functions`` entry, or the function of a ``tools`` entry."""
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    return item if isinstance(item, dict) and isinstance(item.get("name"), str) else None


def _cookbook(functions: list[dict[str, Any]], count: Callable[[str], int]) -> int:
    total = FUNC_END
    for function in functions:
        description = str(function.get("description") or "").removesuffix(".")
        total += FUNC_INIT + count(f"{function['name']}:{description}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not properties:
            continue
        total += PROP_INIT
        for key, prop in properties.items():
            prop = prop if isinstance(prop, dict) else {}
            total += PROP_KEY
            if isinstance(prop.get("enum"), list):
                total += ENUM_INIT
                total += sum(ENUM_ITEM + count(str(item)) for item in prop["enum"])
            description = str(prop.get("description") or "").removesuffix(".")
            total += count(f"{key}:{prop.get('type')}:{description}")
    return total


def _comment(description: Any) -> list[str]:
    return [f"// {line}" for line in str(description).splitlines()] if description else []


def _namespace(functions: list[dict[str, Any]]) -> str:
    lines = ["# Tools", "", "## functions", "", "namespace functions {", ""]
    for function in functions:
        lines += _comment(function.get("description"))
        parameters = function.get("parameters")
        if isinstance(parameters, dict) and parameters.get("properties"):
            lines.append(f"type {function['name']} = (_: {_typescript(parameters)}) => any;")
        else:
            lines.append(f"type {function['name']} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


def _typescript(schema: Any) -> str:
    """A JSON schema as the TypeScript type the models are shown."""
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("enum"), list):
        return " | ".join(_json(item) for item in schema["enum"]) or "never"
    if "const" in schema:
        return _json(schema["const"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(_typescript(item) for item in schema[key]) or "never"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_typescript({**schema, "type": item}) for item in kind) or "never"
    if kind == "array":
        return f"Array<{_typescript(schema.get('items'))}>"
    if kind == "object" or isinstance(schema.get("properties"), dict):
        listed = schema.get("required")
        required = listed if isinstance(listed, list) else []
        lines = ["{"]
        for name, prop in (schema.get("properties") or {}).items():
            lines += _comment(prop.get("description") if isinstance(prop, dict) else None)
            lines.append(f"{name}{'' if name in required else '?'}: {_typescript(prop)},")
        return "\n".join([*lines, "}"])
    return {"integer": "number", "number": "number", "string": "string",
            "boolean": "boolean", "null": "null"}.get(str(kind), "any")  # fmt: skip


def _response_format(value: Any, count: Callable[[str], int]) -> int:
    readings = [count(_json(value))]
    schema = value.get("json_schema") if isinstance(value, dict) else None
    if isinstance(schema, dict):
        try:
            shown = f"// {schema.get('name')}\n{_typescript(schema.get('schema'))}"
        except RecursionError:
            shown = ""
        readings.append(count(shown))
    return max(readings)


# -- the Responses and Embeddings APIs -----------------------------------------------------

#: OpenAI's embedding models read at most this many tokens of one input.
EMBEDDING_INPUT_TOKENS = 8192


def response_messages(body: Mapping[str, Any]) -> list[Any]:
    """A Responses body's prompt as the model reads it: the instructions as a system
    message, then the input items (a string input is one user message)."""
    items = body.get("input")
    messages = [{"role": "user", "content": items}] if isinstance(items, str) else list(items or [])
    if body.get("instructions"):
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    return [_chat_item(item) for item in messages]


def _chat_item(item: Any) -> Any:
    """A Responses item with its parts renamed to chat's (``input_text`` is ``text``)."""
    if not isinstance(item, dict) or not isinstance(item.get("content"), list):
        return item
    parts = []
    for part in item["content"]:
        if isinstance(part, dict) and part.get("type") in ("input_text", "output_text"):
            part = {"type": "text", "text": part.get("text")}
        elif isinstance(part, dict) and part.get("type") == "input_image":
            part = {"type": "image_url", "image_url": {"url": part.get("image_url"),
                                                      "detail": part.get("detail")}}  # fmt: skip
        parts.append(part)
    return {**item, "content": parts}


def bill_response(body: Mapping[str, Any], media: Media | None = None) -> Bill:
    """A Responses call: the prompt as chat bills it, the whole ``max_output_tokens``
    written (half of it reasoning, for a reasoning model)."""
    chat = {
        "model": body.get("model"),
        "messages": response_messages(body),
        "tools": body.get("tools"),
        "tool_choice": body.get("tool_choice"),
        "max_completion_tokens": body.get("max_output_tokens"),
    }
    if isinstance(body.get("text"), dict) and body["text"].get("format") is not None:
        chat["response_format"] = body["text"]["format"]
    return bill({key: value for key, value in chat.items() if value is not None}, media)


def response_usage(bill: Bill) -> dict[str, Any]:
    return {
        "input_tokens": bill.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": bill.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": bill.reasoning_tokens},
        "total_tokens": bill.prompt_tokens + bill.completion_tokens,
    }


def embedding_tokens(body: Mapping[str, Any]) -> int:
    """What OpenAI bills for an embeddings body: each text's tokens, each token array's
    length; an input over ``EMBEDDING_INPUT_TOKENS`` is refused."""
    value = body.get("input")
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    ):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > 2048:
        raise Refused("'$.input' is invalid.", code="invalid_input", param="input")
    count = _counter(str(body.get("model")))
    total = 0
    for item in value:
        tokens = count(item) if isinstance(item, str) else len(item)
        if tokens > EMBEDDING_INPUT_TOKENS:
            raise Refused(
                f"This model's maximum context length is {EMBEDDING_INPUT_TOKENS} tokens, "
                f"however you requested {tokens} tokens in the input.",
                code="context_length_exceeded", param="input",
            )  # fmt: skip
        total += tokens
    return total


def embeddings_answer(body: Mapping[str, Any], prompt_tokens: int) -> dict[str, Any]:
    """An embeddings answer in OpenAI's shape: a small deterministic vector per input,
    as floats or as base64 of little-endian float32 (what the SDK asks for)."""
    value = body.get("input")
    items = value if isinstance(value, list) else [value]
    count = 1 if all(isinstance(v, int) for v in items) else len(items)
    dimensions: int = body["dimensions"] if isinstance(body.get("dimensions"), int) else 8
    data = []
    for index in range(count):
        vector = [round(math.sin(index + d + 1), 6) for d in range(max(1, min(dimensions, 64)))]
        if body.get("encoding_format") == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding: Any = base64.b64encode(packed).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


# -- the Anthropic Messages API ------------------------------------------------------------

#: Anthropic's tool-use system prompt on the Claude 4 models ("Tool use: pricing").
CLAUDE_TOOL_PROMPT = 346
#: No Claude tokenizer ships offline: the oracle bills Claude's text with cl100k_base, a
#: byte-level BPE of about the same density, as a stand-in for Anthropic's count.
CLAUDE_STAND_IN = "gpt-4"


def claude_prompt_tokens(body: Mapping[str, Any]) -> int:
    """What Anthropic bills as input for a Messages body, as the oracle reads it: the
    system prompt and the messages by the chat formula, the tools' JSON and the tool-use
    system prompt, text counted with ``CLAUDE_STAND_IN``'s encoding."""
    count = _counter(CLAUDE_STAND_IN)
    messages = list(body.get("messages") or [])
    if body.get("system"):
        messages.insert(0, {"role": "system", "content": body["system"]})
    total = _messages(messages, CLAUDE_STAND_IN, count, Media(lenient=True))
    if body.get("tools"):
        total += CLAUDE_TOOL_PROMPT + count(_json(body["tools"]))
    if body.get("tool_choice") is not None:
        total += count(_json(body["tool_choice"]))
    return total


def _cache_ttls(value: Any) -> set[str]:
    """The TTLs of every ``cache_control`` in a Messages body ("5m" unless it says "1h")."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            control = item.get("cache_control")
            if isinstance(control, Mapping):
                found.add("1h" if control.get("ttl") == "1h" else "5m")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def claude_usage(body: Mapping[str, Any], output_tokens: int) -> dict[str, Any]:
    """Anthropic's ``usage`` for a Messages body, at its dearest: a body that asks for
    prompt caching has its whole prompt written to the cache, at the longest TTL it
    names (1.25x the input price for 5 minutes, 2x for an hour)."""
    prompt = claude_prompt_tokens(body)
    ttls = _cache_ttls(body)
    if not ttls:
        return {"input_tokens": prompt, "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}  # fmt: skip
    ttl = "1h" if "1h" in ttls else "5m"
    return {
        "input_tokens": 0, "output_tokens": output_tokens,
        "cache_creation_input_tokens": prompt, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": prompt if ttl == "5m" else 0,
                           "ephemeral_1h_input_tokens": prompt if ttl == "1h" else 0},
    }  # fmt: skip


def claude_charged_input(usage: Mapping[str, Any]) -> int:
    """The input tokens ``usage`` costs, cache writes at their premium, rounded up."""
    written = usage.get("cache_creation") or {}
    premium = (written.get("ephemeral_5m_input_tokens", 0) * 5 + 3) // 4  # 1.25x, up
    premium += written.get("ephemeral_1h_input_tokens", 0) * 2
    return usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) + premium


def message_object(
    body: Mapping[str, Any], text: str, usage: dict[str, Any], stop_reason: str
) -> dict[str, Any]:
    """An Anthropic ``message`` answer of ``text``."""
    return {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason, "stop_sequence": None, "usage": usage,
    }  # fmt: skip


def message_events(message: dict[str, Any], pieces: list[str]) -> list[dict[str, Any]]:
    """A streamed ``message`` as Anthropic sends it: ``message_start`` (input usage),
    ``content_block_*``, ``message_delta`` (the output count), ``message_stop``."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}  # fmt: skip
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        for piece in pieces
    ]
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                            "stop_sequence": None},
         "usage": {"output_tokens": usage["output_tokens"]}},
        {"type": "message_stop"},
    ]  # fmt: skip
    return events
