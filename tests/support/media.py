"""Images, audio and files for tests: real headers (what any reader of them looks at),
padded to a chosen size, and the data URLs and content parts that carry them."""

from __future__ import annotations

import base64
import struct
import zlib


def png(width: int, height: int, padding: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
        + struct.pack(">I", zlib.crc32(chunk)) + b"\0" * padding
    )  # fmt: skip


def gif(width: int, height: int, padding: int = 0) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\0" * (3 + padding)


def jpeg(width: int, height: int, padding: int = 0, exif: int = 0) -> bytes:
    """SOI, an APP1 segment of ``exif`` bytes (a camera's metadata comes first), SOF0."""
    app1 = b"\xff\xe1" + struct.pack(">H", exif + 2) + b"\0" * exif if exif else b""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app1 + sof + b"\0" * padding + b"\xff\xd9"


def webp(width: int, height: int, kind: str = "VP8 ", padding: int = 0) -> bytes:
    if kind == "VP8 ":
        body = b"\0\0\0" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
    elif kind == "VP8L":
        body = b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little")
    else:  # VP8X
        body = b"\0" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body += b"\0" * padding
    chunk = kind.encode() + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", len(chunk) + 4) + b"WEBP" + chunk


def wav(seconds: float, rate: int = 16_000, channels: int = 1, bits: int = 16) -> bytes:
    block = channels * bits // 8
    data = b"\0" * (int(seconds * rate) * block)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", 4 + len(chunks) + len(data)) + b"WAVE" + chunks + data


#: MPEG-1 Layer III bitrate indexes (kbps); MPEG-2 for the low rates.
_MPEG1 = {32: 1, 64: 5, 128: 9, 320: 14}
_MPEG2 = {8: 1, 16: 2, 24: 3}


def mp3(seconds: float, kbps: int = 64) -> bytes:
    """A constant-bitrate MP3 of ``seconds``: frame headers at ``kbps``, silent frames."""
    if kbps in _MPEG1:
        header = bytes([0xFF, 0xFB, _MPEG1[kbps] << 4, 0xC4])
    else:
        header = bytes([0xFF, 0xF3, _MPEG2[kbps] << 4, 0xC4])
    size = max(int(seconds * kbps * 1000 / 8), 204)  # one frame at least
    return (header + b"\0" * 200) * (size // 204) + b"\0" * (size % 204)


def pdf(pages: int, text: str = "Hello") -> bytes:
    objects = "".join(f"{n} 0 obj << /Type /Page >> endobj\n" for n in range(pages))
    return f"%PDF-1.4\n{objects}BT ({text}) Tj ET\n%%EOF".encode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, detail: str | None = None) -> dict:
    image = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image}


def audio_part(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}  # fmt: skip


def file_part(data: bytes | None = None, file_id: str | None = None) -> dict:
    if file_id is not None:
        return {"type": "file", "file": {"file_id": file_id}}
    url = data_url(data or b"", "application/pdf")
    return {"type": "file", "file": {"filename": "a.pdf", "file_data": url}}
