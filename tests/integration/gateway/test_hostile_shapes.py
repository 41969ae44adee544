"""Input built to break ``/v1/responses``, ``/v1/embeddings`` and ``/v1/messages``: a 400
in the API's error shape (OpenAI's; Anthropic's for messages), never a 500, on the sync
and the async view alike, nothing left reserved. Fuzzed with Hypothesis over JSON values
in the places each body holds input."""

from __future__ import annotations

import json

import pytest
from django.test import AsyncClient, Client, override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_quota.shapes.json_limits import MAX_NESTING
from tests.support import factories
from tests.support.gateway import access_token
from tests.system.test_async_ledger import run_with_orm

pytestmark = pytest.mark.django_db(transaction=True)

ASYNC_URLS = "tests.integration.gateway.async_gateway_urls"
EMBED = "text-embedding-3-small"
CLAUDE = "claude-haiku-4-5"


@pytest.fixture
def token(ledger):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=50)
    factories.price(EMBED, "1", "0")
    factories.price(CLAUDE, "1", "5", context_window=200_000)
    factories.tier("free", is_default=True, requests_per_minute=10_000)
    user = factories.user()
    return user, access_token(user)


def sync_post(path: str, payload: bytes, headers: dict[str, str]):
    response = Client(raise_request_exception=False).post(
        path, payload, content_type="application/json", headers=headers
    )
    response.body = (
        b"".join(response.streaming_content) if response.streaming else response.content
    )
    return response


def async_post(path: str, payload: bytes, headers: dict[str, str]):
    async def main():
        response = await AsyncClient(raise_request_exception=False).post(
            path, payload, content_type="application/json", headers=headers
        )
        if response.streaming:
            response.body = b"".join([part async for part in response.streaming_content])
        else:
            response.body = response.content
        return response

    with override_settings(ROOT_URLCONF=ASYNC_URLS):
        return run_with_orm(main)


VIEWS = {"sync": sync_post, "async": async_post}

HOSTILE = {
    "/v1/responses": [
        b'{"model": "gpt-4o", "input": "\\ud800"}',
        b'{"model": "gpt-4o", "input": [{"role": "user", "content": "\\udfff"}]}',
        json.dumps({"model": "gpt-4o", "input": "x",
                    "tools": [json.loads("[" * (MAX_NESTING + 5) + "]" * (MAX_NESTING + 5))]}
                   ).encode(),  # fmt: skip
        b'{"model": "gpt-4o", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"model": "gpt-4o", "input": "x", "max_output_tokens": 1e400}',
        b'{"model": "gpt-4o", "input": "x", "max_output_tokens": 99999999999999999999}',
        b'{"model": "gpt-4o\\n", "input": "x"}',
        b"not json",
        b"[]",
    ],
    "/v1/embeddings": [
        b'{"model": "' + EMBED.encode() + b'", "input": "\\ud800"}',
        b'{"model": "' + EMBED.encode() + b'", "input": [[1, 2], [3, "4"]]}',
        b'{"model": "' + EMBED.encode() + b'", "input": [1e400]}',
        b'{"model": "' + EMBED.encode() + b'", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"model": "' + EMBED.encode() + b'", "input": [[' + b"1," * 50 + b"-1]]}",
        b'{"model": "' + EMBED.encode() + b'", "input": {"text": "x"}}',
        b"null",
    ],
    "/v1/messages": [
        b'{"model": "claude-haiku-4-5", "max_tokens": 5, '
        b'"messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "claude-haiku-4-5", "max_tokens": 5, "system": "\\udfff", '
        b'"messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "claude-haiku-4-5", "max_tokens": 1e400, '
        b'"messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": '
        + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", '
        b'"content": ' + b"[" * 200 + b"]" * 200 + b"}]}",
        b'{"model": "claude-haiku-4-5", "max_tokens": -1, "messages": []}',
        b"{",
    ],
}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize(
    ("path", "payload"), [(path, body) for path, bodies in HOSTILE.items() for body in bodies]
)
def test_hostile_bodies_are_400_never_500_and_nothing_is_held(
    ledger, token, view, path, payload
):
    user, access = token
    response = VIEWS[view](path, payload, {"Authorization": f"Bearer {access}"})
    assert response.status_code == 400, response.body[:300]
    error = json.loads(response.body)["error"]
    if path.endswith("messages"):
        assert json.loads(response.body)["type"] == "error"
        assert set(error) == {"type", "message"}
    else:
        assert set(error) >= {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    live = ledger.usage(user.pk)
    assert live.reserved == 0 and live.in_flight == 0 and live.requests_this_minute == 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("path", HOSTILE)
def test_fuzzed_bodies_never_get_a_500_nor_leak_a_reservation(ledger, token, path):
    user, access = token
    headers = {"Authorization": f"Bearer {access}"}
    model = {"responses": "gpt-4o", "embeddings": EMBED, "messages": CLAUDE}[path.split("/")[-1]]

    @given(
        fields=st.dictionaries(
            st.sampled_from(["input", "instructions", "tools", "max_output_tokens", "stream",
                             "text", "tool_choice", "dimensions", "encoding_format",
                             "messages", "system", "max_tokens", "thinking"]),
            JSON, max_size=4,
        ),  # fmt: skip
    )
    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(fields):
        payload = json.dumps({"model": model, **fields}).encode()
        response = sync_post(path, payload, headers)
        assert response.status_code < 500, (payload[:300], response.body[:300])
        live = ledger.usage(user.pk)
        assert live.reserved == 0 and live.in_flight == 0

    check()
