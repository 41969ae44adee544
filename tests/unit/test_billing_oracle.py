"""The oracle's own rules (``llm_quota.testing.billing``) against the published examples:
the tests trust it to bill like OpenAI, so it is checked against OpenAI's own figures."""

from __future__ import annotations

import pytest

from llm_quota.testing import billing
from tests.support import media

MSGS = [{"role": "user", "content": "hello world"}]


@pytest.mark.parametrize(
    ("model", "size", "detail", "tokens"),
    [
        ("gpt-4o", (1024, 1024), "high", 765),  # the vision guide's examples
        ("gpt-4o", (2048, 4096), "high", 1105),
        ("gpt-4o", (4096, 8192), "low", 85),
        ("gpt-4o", (512, 512), None, 255),  # auto is high; no upscaling
        ("gpt-4o-mini", (512, 512), "high", 2833 + 5667),
        ("gpt-4o-mini", (800, 600), "low", 2833),
        ("o3", (1024, 1024), "auto", 75 + 4 * 150),
        ("gpt-5", (1024, 1024), "high", 70 + 4 * 140),
        ("gpt-4o-2024-08-06", (1024, 1024), "high", 765),
        ("gpt-4.1-mini", (1024, 1024), None, 1659),  # 1024 patches x 1.62
        ("gpt-4.1-mini", (1800, 2400), None, 2353),  # 1452 patches x 1.62
        ("gpt-4.1-nano", (1800, 2400), "low", 3572),  # patches ignore the detail
        ("o4-mini", (100, 100), None, 28),  # 16 patches x 1.72
    ],
)
def test_images_cost_what_the_vision_guide_says(model, size, detail, tokens):
    assert billing.image_tokens(model, size, detail) == tokens


def test_an_unknown_model_pays_the_dearest_rule():
    assert billing.image_tokens("mystery", (768, 2048), "high") == 2833 + 8 * 5667


@pytest.mark.parametrize(
    "data",
    [
        media.png(300, 200),
        media.gif(300, 200),
        media.jpeg(300, 200, exif=5000),
        media.webp(300, 200),
        media.webp(300, 200, "VP8L"),
        media.webp(300, 200, "VP8X"),
    ],
)
def test_image_sizes_are_read_from_every_format(data):
    assert billing.image_size(data) == (300, 200)


def test_audio_is_billed_by_its_duration():
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        media.audio_part(media.wav(2.5), "wav"), media.audio_part(media.mp3(3, 8), "mp3"),
    ]}]}  # fmt: skip
    plain = billing.prompt_tokens({"model": "gpt-4o", "messages": [{"role": "user"}]})
    parts = 2 * billing.MEDIA_PART_TOKENS
    assert billing.prompt_tokens(body) == plain + parts + 25 + 30


def test_messages_follow_the_cookbook():
    count = billing._counter("gpt-4o")
    expected = 3 + count("user") + count("hello world") + 3
    assert billing.prompt_tokens({"model": "gpt-4o", "messages": MSGS}) == expected


def test_functions_are_billed_at_the_harshest_reading():
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city"},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}]  # fmt: skip
    count = billing._counter("gpt-4o")
    plain = billing.prompt_tokens({"model": "gpt-4o", "messages": MSGS})
    functions = [tools[0]["function"]]
    readings = [
        billing._cookbook(functions, count),
        count(billing._namespace(functions)),
        count(billing._json(tools)),
    ]
    assert billing.prompt_tokens({"model": "gpt-4o", "messages": MSGS, "tools": tools}) == (
        plain + max(readings)
    )
    as_functions = {"model": "gpt-4o", "messages": MSGS, "functions": functions}
    assert billing.prompt_tokens(as_functions) > plain


def test_reasoning_models_refuse_max_tokens_like_openai():
    with pytest.raises(billing.Refused) as refused:
        billing.bill({"model": "o3", "messages": MSGS, "max_tokens": 10})
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "max_tokens"
    bill = billing.bill({"model": "o3", "messages": MSGS, "max_completion_tokens": 10, "n": 2})
    assert bill.completion_tokens == 20 and bill.reasoning_tokens == 10


def test_a_prompt_over_the_context_window_is_refused():
    body = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 128_000}
    with pytest.raises(billing.Refused) as refused:
        billing.bill(body)
    assert refused.value.code == "context_length_exceeded"


def test_what_the_oracle_cannot_read_or_find_is_refused_and_the_fake_bills_it_anyway():
    for part in (
        media.image_part("https://example.test/cat.png"),
        media.image_part(media.data_url(b"not an image")),
        media.file_part(file_id="file-123"),
    ):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [part]}]}
        with pytest.raises(billing.Refused):
            billing.prompt_tokens(body)
        assert billing.prompt_tokens(body, billing.Media(lenient=True)) > 0
    url = "https://example.test/cat.png"
    known = billing.Media(images={url: (1024, 1024)})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [media.image_part(url)]}]}
    assert billing.prompt_tokens(body, known) == billing.prompt_tokens(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": []}]}
    ) + billing.MEDIA_PART_TOKENS + 765
