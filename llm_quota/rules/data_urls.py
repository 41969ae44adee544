"""Bytes of base64 payloads (data URLs, ``input_audio.data``) without decoding them whole.

A header (an image's size, a WAV file's byte rate) is a few bytes at known offsets of a
payload that may be megabytes long: ``Base64Bytes.read`` decodes only the 4-character
groups those bytes sit in.
"""

from __future__ import annotations

import base64
import binascii

from llm_quota.rules.accounting import ceil_div


def payload(url: str) -> str | None:
    """The base64 text of a ``data:...;base64,`` URL, else None."""
    header, comma, data = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        return None
    return data


class Base64Bytes:
    """Byte ranges of a base64 text, decoding only the groups they sit in."""

    def __init__(self, text: str) -> None:
        if any(ch in text for ch in " \n\r\t"):  # line-wrapped base64: offsets need it joined
            text = "".join(text.split())
        self.text = text

    @property
    def size(self) -> int:
        """How many bytes the text decodes to (padding left out)."""
        return len(self.text) * 3 // 4 - self.text[-2:].count("=")

    def read(self, start: int, length: int) -> bytes:
        first = start // 3 * 4
        chunk = self.text[first : ceil_div(start + length, 3) * 4]
        try:
            raw = base64.b64decode(chunk + "=" * (-len(chunk) % 4))
        except (binascii.Error, ValueError):
            return b""
        offset = start - first // 4 * 3
        return raw[offset : offset + length]
