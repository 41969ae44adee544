"""Prompt counting: exact where an encoding loads, an upper bound where none does."""

from __future__ import annotations

import pytest

from llm_quota.rules import estimation
from llm_quota.rules.estimation import (
    byte_bound,
    count_messages,
    count_text,
    load_encoding,
    prompt_bounds,
)


def test_counts_chat_messages_with_openai_overhead():
    enc = load_encoding("cl100k_base")
    msgs = [{"role": "user", "content": "hello world"}]
    expected = 3 + len(enc.encode("user")) + len(enc.encode("hello world")) + 3
    assert count_messages(msgs, "gpt-4", encoding_name="cl100k_base") == expected


def test_offline_fallback_loads_when_the_download_is_impossible():
    # This machine has no route to the encodings' host: o200k falls back to the bundled copy.
    assert load_encoding("o200k_base") is not None
    assert count_messages([{"role": "user", "content": "hi"}], "gpt-4o") > 0


def test_list_of_parts_and_images_are_counted():
    text_only = count_messages(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "gpt-4o"
    )
    with_image = count_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                ],
            }
        ],
        "gpt-4o",
    )
    # A size that can't be read costs the family's worst case: 85 + 170 x 8 tiles.
    assert with_image == text_only + estimation.MEDIA_PART_TOKENS + 1445


def test_odd_text_never_raises():
    odd = ["<|endoftext|>", "\ud800 lone surrogate", "\x00\x01", "🦄" * 100, "a" * 100_000]
    for text in odd:
        n = count_messages([{"role": "user", "content": text}], "gpt-4o")
        assert 0 < n
    assert count_messages([{"role": "user", "content": {"weird": [1, 2]}}], "gpt-4o") > 0
    assert count_messages(None, "gpt-4o") == 3
    assert count_messages([None, 5, "x"], "gpt-4o") > 0


def test_byte_count_is_an_upper_bound_when_no_encoding_loads():
    text = "naïve café — 漢字 🦄 " * 50
    assert count_text(text, None) == byte_bound(text)
    assert count_text(text, load_encoding("cl100k_base")) <= byte_bound(text)


def test_bounds_bracket_the_exact_count_for_any_text():
    samples = [
        [{"role": "user", "content": "hello " * 5000}],
        [
            {"role": "system", "content": "漢字かな交じり文 " * 3000},
            {"role": "user", "content": "🦄" * 500},
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "x" * 40_000},
                    {"type": "image_url", "image_url": {"url": "u"}},
                ],
            }
        ],
        "a plain string prompt",
    ]
    for messages in samples:
        lower, upper = prompt_bounds(messages)
        for model in ("gpt-4o", "gpt-4"):
            exact = count_messages(messages, model)
            assert lower <= exact <= upper, (model, lower, exact, upper)


def test_chunked_counting_is_exact_and_stops_early():
    text = "The quick brown fox jumps over the lazy dog. " * 20_000  # ~900 KB
    enc = load_encoding("cl100k_base")
    assert count_text(text, enc) == len(enc.encode(text))
    partial = count_messages([{"role": "user", "content": text}], "gpt-4", stop_above=1000)
    assert 1000 < partial < 100_000


@pytest.mark.django_db
def test_a_prompt_over_the_context_window_is_refused_without_counting_it_all(monkeypatch):
    from llm_quota.exceptions import InvalidRequest
    from llm_quota.quota import admission
    from llm_quota.rules import estimation
    from tests.support import factories

    factories.price("small-ctx", "1", "1", context_window=3000)
    encoded = []
    real = estimation._encode_len

    def counting(text, encoding):
        encoded.append(len(text))
        return real(text, encoding)

    monkeypatch.setattr(estimation, "_encode_len", counting)

    def ask(text):
        with pytest.raises(InvalidRequest) as info:
            admission.estimate_request("small-ctx", messages=[{"role": "user", "content": text}])
        assert info.value.error_code == "context_length_exceeded"

    # ~45k tokens, but a lower bound (bytes / 128) under the window: counting starts,
    # and stops once past 3,000 tokens, a chunk in.
    ask("The quick brown fox jumps over the lazy dog. " * 4500)
    assert 0 < sum(encoded) <= 2 * estimation.CHUNK_CHARS
    # 2 MB: the lower bound alone exceeds the window, so nothing is tokenized.
    encoded.clear()
    ask("x" * 2_000_000)
    assert encoded == []
