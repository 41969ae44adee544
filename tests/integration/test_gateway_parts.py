"""The gateway's small parts on their own: headers, request checks, SSE, the relay."""

from __future__ import annotations

import json

import pytest

from llm_quota import quota_guard
from llm_quota.drf.headers import go_duration, headers_for
from llm_quota.exceptions import InvalidRequest
from llm_quota.gateway import sse
from llm_quota.gateway.relay import Relay
from llm_quota.gateway.upstream import NotConfigured, UpstreamError, get_upstream
from llm_quota.ledger.replies import Decision
from llm_quota.rules.estimation import count_messages, count_output
from llm_quota.shapes import chat as chat_shape
from llm_quota.shapes.chat import ChatRequest, StreamWatch, read_completion
from llm_quota.testing.fake_provider import FakeProvider
from tests.support import factories

MSGS = [{"role": "user", "content": "Tell me a long story about quotas."}]


@pytest.mark.parametrize(
    "seconds, text",
    [(0.017, "17ms"), (1, "1s"), (1.5, "1.5s"), (60, "1m0s"), (90, "1m30s"), (3661, "1h1m1s")],
)
def test_resets_are_written_as_openai_does(seconds, text):
    assert go_duration(seconds) == text


def test_headers_follow_openai_and_the_ietf_draft():
    decision = Decision(
        True, None, 0.0, None, 100, requests_limit=60, requests_remaining=59, requests_reset=0.4,
        tokens_limit=20_000, tokens_remaining=19_000, tokens_reset=59.2,
    )  # fmt: skip
    headers = headers_for(decision)
    assert headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-reset-requests"] == "400ms"
    assert headers["x-ratelimit-reset-tokens"] == "59.2s"
    assert headers["RateLimit-Policy"] == '"requests";q=60;w=60, "tokens";q=20000;w=60;qu="tokens"'
    assert headers["RateLimit"] == '"requests";r=59;t=1, "tokens";r=19000;t=60'


def test_unlimited_windows_are_left_out_rather_than_invented():
    assert headers_for(Decision(True, None, 0.0, None, 100)) == {}
    assert headers_for(None) == {}


def test_upstream_body_carries_the_reserved_cap_and_asks_for_usage():
    chat = ChatRequest.from_body(
        {"model": "gpt-4o", "messages": MSGS, "max_tokens": 500, "stream": True, "top_p": 0.5,
         "vendor_extension": {"keep": True}}
    )  # fmt: skip
    body = chat.upstream_body(120)
    assert body["max_tokens"] == 120 and body["stream_options"] == {"include_usage": True}
    assert body["top_p"] == 0.5 and body["vendor_extension"] == {"keep": True}
    assert chat.body["max_tokens"] == 500  # the caller's body is not modified
    assert ChatRequest.from_body({"model": "m", "messages": MSGS}).upstream_body(7) == {
        "model": "m", "messages": MSGS, "max_tokens": 7,
    }  # fmt: skip


def test_the_billed_fields_are_what_the_request_is_priced_on(monkeypatch):
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = {"model": "m", "messages": MSGS, "tools": tools, "n": 2, "top_p": 1, "user": "u"}
    assert ChatRequest.from_body(body).quota_kwargs() == {
        "model": "m", "max_tokens": None, "choices": 2, "messages": MSGS, "tools": tools,
    }  # fmt: skip
    monkeypatch.setattr(chat_shape, "BILLED_FIELDS", ("messages",))
    assert "tools" not in ChatRequest.from_body(body).quota_kwargs()


def test_an_answer_is_settled_from_its_usage_else_from_its_text():
    message = {"role": "assistant", "content": "Hi", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}  # fmt: skip
    completion = {"choices": [{"message": message}], "usage": {"completion_tokens": 3}}
    assert read_completion(completion).usage == {"completion_tokens": 3}
    # A usage is settled from with the text, which stands in for a bad count there.
    assert read_completion({**completion, "usage": {"completion_tokens": "3"}}).usage == {
        "completion_tokens": "3"
    }
    assert read_completion({**completion, "usage": "3"}).usage is None
    assert read_completion(completion).text == "Hif{}"


def test_the_stream_watch_hides_the_usage_chunk_the_client_did_not_ask_for():
    watch = StreamWatch(include_usage=False)
    delta = json.dumps({"choices": [{"delta": {"content": "Hi"}}], "usage": None})
    assert json.loads(watch.feed(delta)) == {"choices": [{"delta": {"content": "Hi"}}]}
    assert watch.feed(json.dumps({"choices": [], "usage": {"completion_tokens": 1}})) is None
    assert watch.feed("[DONE]") is None and watch.ended
    assert watch.used == chat_shape.Used({"completion_tokens": 1}, "Hi")


def test_the_upstream_is_the_one_configured_and_never_invented(settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UPSTREAM": "llm_quota.testing.FakeProvider"}
    assert isinstance(get_upstream(), FakeProvider)
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UPSTREAM": None, "OPENAI_BASE_URL": None}
    assert isinstance(get_upstream(), NotConfigured)
    with pytest.raises(UpstreamError) as refused:
        get_upstream().complete({"model": "m", "messages": MSGS})
    assert (refused.value.status, refused.value.code) == (502, "upstream_not_configured")


@pytest.mark.parametrize(
    "body",
    [None, [], "text", {"messages": MSGS}, {"model": "", "messages": MSGS},
     {"model": "a b", "messages": MSGS}, {"model": "m", "messages": [1]},
     {"model": "m", "messages": [{"role": "user", "content": 5}]},
     {"model": "m", "messages": MSGS, "max_tokens": True},
     {"model": "m", "messages": MSGS, "max_completion_tokens": -1},
     {"model": "m", "messages": MSGS, "stream": True, "stream_options": "x"},
     {"model": "m", "messages": MSGS, "tools": {}}],
)  # fmt: skip
def test_bad_bodies_are_invalid_requests(body):
    with pytest.raises(InvalidRequest):
        ChatRequest.from_body(body)


def test_sse_reader_joins_data_lines_and_skips_comments():
    lines = [": keep-alive", "", "event: x", "data: {\"a\":", "data: 1}", "", "data: [DONE]"]
    assert list(sse.iter_data(lines)) == ['{"a":\n1}', "[DONE]"]
    assert sse.event({"a": 1}) == b'data: {"a":1}\n\n'


def test_fake_provider_is_deterministic_and_respects_the_cap():
    body = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 7}
    first, second = FakeProvider().complete(body), FakeProvider().complete(body)
    assert first["choices"] == second["choices"]
    text = first["choices"][0]["message"]["content"]
    assert first["usage"]["completion_tokens"] == count_output(text, "gpt-4o") <= 7
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["prompt_tokens"] == count_messages(MSGS, "gpt-4o")
    *chunks, last = FakeProvider().stream(body)
    streamed = "".join(
        c["choices"][0]["delta"].get("content", "")
        for c in map(json.loads, chunks)
        if c["choices"]
    )
    assert streamed == text and last == "[DONE]"  # as OpenAI ends a stream


@pytest.mark.django_db
def test_closing_the_relay_mid_stream_charges_what_was_generated(ledger):
    factories.price("gpt-4o", "1", "4")
    factories.tier("free", is_default=True)
    user = factories.user()
    guard = quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=60).admit()
    body = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 60, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    relay = Relay(FakeProvider().stream(body), guard, StreamWatch(include_usage=False))
    events = iter(relay)
    received = [next(events) for _ in range(6)]  # role chunk + 5 words
    assert ledger.usage(user.pk).reserved == guard.reservation.reserved
    relay.close()  # what the server does when the client disconnects
    text = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content", "")
        for e in received
    )
    used = ledger.usage(user.pk)
    assert used.reserved == 0 and used.in_flight == 0
    assert used.by_model[0].output_tokens == count_output(text, "gpt-4o")
    assert used.by_model[0].input_tokens == guard.estimate.prompt_tokens


def test_checks_warn_without_the_middleware_and_refuse_a_bad_upstream_url(settings):
    from llm_quota.checks import check_gateway

    assert check_gateway() == []
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if not m.startswith("llm_quota")]
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "OPENAI_BASE_URL": "ftp://example.com"}
    assert {error.id for error in check_gateway()} == {"llm_quota.W003", "llm_quota.E011"}


@pytest.mark.django_db
def test_a_stream_closed_before_its_first_byte_still_ends_its_reservation(ledger):
    factories.price("gpt-4o", "1", "4")
    factories.tier("free", is_default=True)
    user = factories.user()
    guard = quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=60).admit()
    stream = FakeProvider().stream({"model": "gpt-4o", "messages": MSGS, "max_tokens": 60})
    Relay(stream, guard, StreamWatch(include_usage=False)).close()
    used = ledger.usage(user.pk)
    assert used.reserved == 0 and used.in_flight == 0
    assert used.by_model[0].output_tokens == 0  # nothing was read, nothing is charged for it


class _Stream(list):
    """An upstream stream of the given payloads."""

    def close(self) -> None:
        pass


@pytest.mark.django_db
@pytest.mark.parametrize(
    "payloads, last",
    [
        (['{"choices": [{"delta": {"content": "Hi"}}]}', "[DONE]"], "data: [DONE]\n\n"),
        (['{"choices": [{"delta": {"content": "Hi"}}]}'], "upstream_truncated"),
        (['{"choices": [{"delta": {"content": "Hi"}}]}', '{"error": {"message": "boom"}}',
          '{"choices": [{"delta": {"content": "late"}}]}'], '"boom"'),
    ],
    ids=["done", "cut short", "upstream error"],
)  # fmt: skip
def test_done_ends_only_a_complete_stream_and_nothing_follows_an_upstream_error(
    ledger, payloads, last
):
    factories.price("gpt-4o", "1", "4")
    factories.tier("free", is_default=True)
    guard = quota_guard(factories.user(), model="gpt-4o", messages=MSGS, max_tokens=60).admit()
    relay = Relay(_Stream(payloads), guard, StreamWatch(include_usage=False))
    events = [event.decode() for event in relay]
    assert last in events[-1] and "late" not in "".join(events)
    assert sum("[DONE]" in event for event in events) == (last == "data: [DONE]\n\n")
    assert guard.finished
