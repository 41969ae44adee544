"""What an ``input_audio`` part costs in prompt tokens, bounded from above.

OpenAI bills audio by its duration: "Audio tokens in user messages are 1 token per
100 ms of audio" (the Realtime guide, "Managing costs"; input audio in Chat Completions
is the same model's input). The base64 text is not what is billed: counted as text it
would be a thousand times the bill, and refuse every audio call.

The duration is read where the data says it: a PCM WAV header gives its byte rate, and
no sample can be heard that the bytes do not hold, so ``bytes / byte rate`` is an upper
bound. Anything else (MP3, a header that is not plain PCM) lasts at most its bytes at
the lowest bitrate a speech codec uses, ``MIN_BYTES_PER_SECOND``: about 20 times the real
length of a 128 kbit/s MP3, but never less than it.
"""

from __future__ import annotations

import struct

from llm_quota.rules.accounting import ceil_div
from llm_quota.rules.data_urls import Base64Bytes, payload

TOKENS_PER_SECOND = 10
#: 6 kbit/s: Opus' floor, the lowest of the common speech codecs (MP3's is 8 kbit/s).
MIN_BYTES_PER_SECOND = 750
#: WAV formats whose byte rate is the whole story: PCM, IEEE float, and "extensible".
PLAIN_FORMATS = frozenset({1, 3, 0xFFFE})
#: A WAV file's fmt chunk comes within its first chunks; past these, give up (bytes bound).
MAX_CHUNKS = 16


def audio_tokens(data: object) -> int:
    """Tokens ``input_audio.data`` (base64, or a base64 data URL) costs, at most."""
    if not isinstance(data, str):
        return 0
    raw = Base64Bytes(payload(data) or data)
    byte_rate = _wav_byte_rate(raw) or MIN_BYTES_PER_SECOND
    return ceil_div(raw.size * TOKENS_PER_SECOND, byte_rate)


def _wav_byte_rate(raw: Base64Bytes) -> int | None:
    """The byte rate of a plain PCM WAV header, when it is consistent, else None."""
    head = raw.read(0, 12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    at = 12
    for _ in range(MAX_CHUNKS):
        chunk = raw.read(at, 24)
        if len(chunk) < 8:
            return None
        kind, size = chunk[:4], struct.unpack("<I", chunk[4:8])[0]
        if kind == b"fmt ":
            if len(chunk) < 24:
                return None
            fmt, channels, rate, byte_rate, block, bits = struct.unpack("<HHIIHH", chunk[8:24])
            plain = fmt in PLAIN_FORMATS and channels >= 1 and bits in (8, 16, 24, 32, 64)
            if plain and block == channels * bits // 8 and byte_rate == rate * block:
                return byte_rate or None
            return None
        at += 8 + size + (size & 1)
    return None
