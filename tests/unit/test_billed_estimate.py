"""The prompt's estimate counts every billed field (contract section 5) and bounds the
oracle's bill (``testing.billing``: OpenAI's rules, written apart) for any request built
from them; its tokenizer-free bounds stay bounds; audio and files are bounded by what
their data can prove, never by their base64 text."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from llm_quota.rules import audio, estimation
from llm_quota.rules.estimation import bound_prompt, count_prompt, counts_quickly, load_encoding
from llm_quota.shapes.chat import BILLED_FIELDS, ChatRequest
from llm_quota.testing import billing
from tests.support import media
from tests.support.billed_requests import FILES, REMOTE, bodies

MSGS = [{"role": "user", "content": "What is the weather like?"}]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather.\nIn any city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}  # fmt: skip
FIELDS = {
    "tools": [TOOL],
    "functions": [TOOL["function"]],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "response_format": {"type": "json_schema", "json_schema": {
        "name": "weather", "schema": TOOL["function"]["parameters"]}},
}  # fmt: skip
fuzz = settings(
    max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


def test_every_billed_field_is_counted_and_bounds_the_oracle():
    assert set(FIELDS) == set(BILLED_FIELDS) - {"messages"}
    plain = count_prompt({"messages": MSGS}, "gpt-4o").tokens
    for name, value in FIELDS.items():
        body = {"model": "gpt-4o", "messages": MSGS, name: value}
        counted = count_prompt(ChatRequest.from_body(body).billed(), "gpt-4o").tokens
        assert counted > plain, name
        assert counted >= billing.prompt_tokens(body), name


@fuzz
@given(body=bodies)
def test_the_count_bounds_what_the_oracle_bills_for_any_request(body):
    chat = ChatRequest.from_body(body)
    count = count_prompt(chat.billed(), chat.model)
    bounds = bound_prompt(chat.billed(), chat.model)
    assert bounds.lower <= count.counted <= count.tokens <= bounds.upper
    assert bounds.unbounded == count.unbounded
    if not count.unbounded:  # a file: only the context window bounds it (admission)
        oracle = billing.Media(images=dict(REMOTE), files=dict(FILES))
        assert count.tokens >= billing.prompt_tokens(body, oracle)


def test_files_and_earlier_audio_are_bounded_by_the_window_alone():
    for content in ([media.file_part(media.pdf(2))], [media.file_part(file_id="file-1")]):
        assert count_prompt([{"role": "user", "content": content}], "gpt-4o").unbounded
    answered = {"role": "assistant", "audio": {"id": "audio_abc"}}
    assert count_prompt([*MSGS, answered], "gpt-4o").unbounded
    assert not count_prompt(MSGS, "gpt-4o").unbounded


def test_images_are_not_bytes_even_in_the_tokenizer_free_bound():
    image = media.image_part(media.data_url(media.png(1024, 1024, padding=6_000_000)))
    bounds = bound_prompt([{"role": "user", "content": [image]}], "gpt-4o")
    assert bounds.upper < 1_000  # 765 for the image, not 8 MB of base64
    unknown = bound_prompt([{"role": "user", "content": [image]}], "")
    assert unknown.upper >= 2833 + 4 * 5667  # no model: the dearest family's rule


def _audio_message(data: bytes, fmt: str) -> list[dict]:
    return [{"role": "user", "content": [media.audio_part(data, fmt)]}]


@pytest.mark.parametrize(
    ("data", "fmt"),
    [(media.wav(12.5), "wav"), (media.wav(3, 8_000, 2, 8), "wav"), (media.mp3(20, 8), "mp3"),
     (media.mp3(20, 128), "mp3")],
)  # fmt: skip
def test_audio_is_bounded_by_its_duration_not_its_base64_text(data, fmt):
    count = count_prompt(_audio_message(data, fmt), "gpt-4o-audio-preview")
    billed = billing.prompt_tokens({"model": "gpt-4o", "messages": _audio_message(data, fmt)})
    as_text = estimation.count_text(
        media.audio_part(data, fmt)["input_audio"]["data"], load_encoding("cl100k_base")
    )
    assert billed <= count.tokens < as_text / 10
    if fmt == "wav":  # the header's byte rate: the bound is the real length, give or take
        assert count.tokens <= billed + 10


def test_audio_with_a_header_that_is_not_plain_pcm_is_bounded_by_its_bytes():
    data = bytearray(media.wav(2))
    data[20] = 0x55  # format 0x55: MP3 inside a WAV file
    assert audio.audio_tokens(media.data_url(bytes(data))) == -(-len(data) * 10 // 750)


def test_deep_nesting_in_a_billed_field_never_breaks_the_count():
    deep: dict = {}
    for _ in range(3_000):
        deep = {"a": deep}
    prompt = {"messages": MSGS, "response_format": deep}
    assert count_prompt(prompt, "gpt-4o").tokens > 3_000
    assert bound_prompt(prompt, "gpt-4o").upper > 3_000


def test_only_plain_short_prompts_are_counted_on_the_event_loop():
    load_encoding("cl100k_base")
    image = media.image_part(media.data_url(media.png(10, 10)))
    assert counts_quickly({"messages": [{"role": "user", "content": [image]}]}, "gpt-4")
    assert not counts_quickly({"messages": MSGS, "tools": [TOOL]}, "gpt-4")
    assert not counts_quickly({"messages": _audio_message(media.wav(1), "wav")}, "gpt-4")
