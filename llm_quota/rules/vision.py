"""What an image costs in prompt tokens, by OpenAI's published rules, never less.

Source: OpenAI's guide "Images and vision", section "Calculating costs" (checked against
its worked examples: 1024x1024 at high detail is 765 tokens on gpt-4o, 2048x4096 is 1105;
1800x2400 is 1452 patches). Two kinds of model:

- tile models: the image is scaled to fit 2048x2048, then its shortest side down to 768,
  then covered with 512px tiles; it costs ``base + per_tile x tiles`` (``detail: low``:
  ``base`` alone). gpt-4o, gpt-4.1, gpt-4.5: 85 + 170; gpt-4o-mini: 2833 + 5667; o1,
  o1-pro, o3: 75 + 150; gpt-5, gpt-5-chat: 70 + 140.
- patch models: 32px patches cover the image, at most 1536 of them (a larger image is
  shrunk to fit), times a multiplier: gpt-4.1-mini and gpt-5-mini 1.62, gpt-4.1-nano and
  gpt-5-nano 2.46, o4-mini 1.72. The guide gives no ``detail`` rule for them: it is
  ignored, which can only over-count.

The estimate must never be under the bill, so where the guide leaves a choice the dearer
one is taken: scaled sides are rounded up (more tiles, never fewer), a patch model is
charged ``min(patches, 1536)`` before its shrink (the shrink only lowers it), the
multiplied figure is rounded up. An image whose size cannot be read (a remote URL, a
broken or unknown header) costs the most any image can cost its model; a model the guide
does not name costs the most over every family. Sizes are read from the headers of PNG,
JPEG, GIF and WebP data URLs, decoding only the bytes the header needs.
"""

from __future__ import annotations

import fnmatch
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from llm_quota.rules.accounting import ceil_div
from llm_quota.rules.data_urls import Base64Bytes, payload

FIT = 2048
SHORT_SIDE = 768
TILE = 512
PATCH = 32
MAX_PATCHES = 1536
#: The most tiles any image can take: 768 x 2048 after scaling is 2 x 4 tiles.
MAX_TILES = 8


@dataclass(frozen=True)
class Family:
    """One row of the guide's tables: a tile model (``base``, ``per_tile``) or a patch
    model (``multiplier``, as a Fraction so the product rounds exactly)."""

    name: str
    base: int = 0
    per_tile: int = 0
    multiplier: Fraction | None = None

    def tokens(self, size: tuple[int, int] | None, detail: Any) -> int:
        """The image's cost; ``size`` None (unknown) is the worst case for the family."""
        if self.multiplier is not None:
            patches = MAX_PATCHES if size is None else min(_patches(*size), MAX_PATCHES)
            product = patches * self.multiplier
            # A whole product may come out a hair above itself in floating point (150 x
            # 1.62 is 243.00000000000003), which a provider would round up: bound that.
            return ceil_div(product.numerator, product.denominator) + (product.denominator == 1)
        if detail == "low":
            return self.base
        tiles = MAX_TILES if size is None else _tiles(*size)
        return self.base + self.per_tile * tiles

    def knows(self, size: tuple[int, int] | None, detail: Any) -> bool:
        """Whether ``tokens`` is the exact cost: the size is known, or does not matter."""
        return size is not None or (self.multiplier is None and detail == "low")


def _family(name: str, *, tile: tuple[int, int] = (0, 0), multiplier: str = "") -> Family:
    return Family(name, *tile, Fraction(multiplier) if multiplier else None)


#: Model name patterns, most specific first; a snapshot (``gpt-4o-2024-08-06``) or a
#: variant (``gpt-4o-audio-preview``) of a model is billed as the model.
FAMILIES: tuple[tuple[tuple[str, ...], Family], ...] = (
    (("gpt-4.1-mini", "gpt-4.1-mini-*", "gpt-5-mini", "gpt-5-mini-*"),
     _family("mini-patch", multiplier="1.62")),
    (("gpt-4.1-nano", "gpt-4.1-nano-*", "gpt-5-nano", "gpt-5-nano-*"),
     _family("nano-patch", multiplier="2.46")),
    (("o4-mini", "o4-mini-*"), _family("o4-mini", multiplier="1.72")),
    (("gpt-4o-mini", "gpt-4o-mini-*"), _family("gpt-4o-mini", tile=(2833, 5667))),
    (("gpt-4o", "gpt-4o-*", "chatgpt-4o-*", "gpt-4.1", "gpt-4.1-*", "gpt-4.5", "gpt-4.5-*"),
     _family("gpt-4o", tile=(85, 170))),
    (("o1", "o1-*", "o3", "o3-*"), _family("o-series", tile=(75, 150))),
    (("gpt-5", "gpt-5-chat*", "gpt-5-20*"), _family("gpt-5", tile=(70, 140))),
)  # fmt: skip


def family_for(model: str) -> Family | None:
    """The guide's row for ``model``, or None for a model it does not name."""
    for patterns, family in FAMILIES:
        if any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns):
            return family
    return None


def image_tokens(model: str, url: Any, detail: Any) -> tuple[int, bool]:
    """(tokens, exact) of one image: exact when both its size and the model's rule are
    known, else the worst case (an upper bound)."""
    size = image_size(url) if isinstance(url, str) else None
    family = family_for(model)
    if family is not None:
        return family.tokens(size, detail), family.knows(size, detail)
    return max(f.tokens(size, detail) for _, f in FAMILIES), False


def _tiles(width: int, height: int) -> int:
    """512px tiles after the two scalings; each side rounded up, so never too few."""
    w, h = Fraction(width), Fraction(height)
    if max(w, h) > FIT:
        scale = FIT / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > SHORT_SIDE:
        scale = SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    return ceil_div(_ceil(w), TILE) * ceil_div(_ceil(h), TILE)


def _ceil(value: Fraction) -> int:
    return -(-value.numerator // value.denominator)


def _patches(width: int, height: int) -> int:
    return ceil_div(width, PATCH) * ceil_div(height, PATCH)


# -- sizes from data URLs ----------------------------------------------------------------

#: A JPEG's size comes after its metadata segments; past this many, give up (worst case).
MAX_JPEG_SEGMENTS = 256


def image_size(url: str) -> tuple[int, int] | None:
    """Width and height of a base64 data URL's PNG, JPEG, GIF or WebP image, else None."""
    text = payload(url)
    if text is None:
        return None
    data = Base64Bytes(text)
    head = data.read(0, 30)
    size = None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        size = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        size = struct.unpack("<HH", head[6:10])
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        size = _webp(head)
    elif head[:3] == b"\xff\xd8\xff":
        size = _jpeg(data)
    if size is None or min(size) < 1:
        return None
    return size


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg(data: Base64Bytes) -> tuple[int, int] | None:
    """Walk the segments to the first start-of-frame marker, which holds the size."""
    at = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        segment = data.read(at, 9)
        if len(segment) < 4 or segment[0] != 0xFF:
            return None
        marker = segment[1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if len(segment) < 9:
                return None
            height, width = struct.unpack(">HH", segment[5:9])
            return width, height
        at += 2 + struct.unpack(">H", segment[2:4])[0]
    return None
