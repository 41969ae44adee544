"""A whole gateway request (JWT, scope, throttle, upstream, settle) costs Redis exactly
two round trips: one EVALSHA to reserve, one to settle. Counted on a private server's
connection, so nothing else's commands blur the figure."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from tests.support import factories

pytestmark = pytest.mark.django_db


def test_a_gateway_request_is_one_round_trip_to_reserve_and_one_to_settle(
    private_redis, monkeypatch
):
    client = private_redis.client()
    set_default_ledger(Ledger(client, prefix="hot"))
    factories.price("gpt-4o", "1", "4")
    tier = factories.tier("free", is_default=True, requests_per_minute=100,
                          tokens_per_month=10**6, max_concurrent_requests=4)  # fmt: skip
    token = str(ScopedTokenObtainPairSerializer.get_token(factories.user(tier)).access_token)
    body = json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    )

    def post():
        return Client().post(
            "/v1/chat/completions", body, content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )  # fmt: skip

    assert post().status_code == 200  # first request: scripts load, the user is restored
    sent: list[bytes] = []
    conn = client.connection_pool.get_connection()
    client.connection_pool.release(conn)
    original = type(conn).send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command if isinstance(command, bytes) else b"".join(command))
        return original(self, command, check_health)

    monkeypatch.setattr(type(conn), "send_packed_command", counting)
    assert post().status_code == 200
    monkeypatch.undo()
    assert len(sent) == 2
    assert all(b"EVALSHA" in command[:40] for command in sent)


def _gateway_user(model: str = "gpt-4o") -> tuple[object, str]:
    """A priced model, a default tier and one of its users with an access token."""
    factories.price(model, "1", "4")
    tier = factories.tier("free", is_default=True, requests_per_minute=100,
                          tokens_per_month=10**6, max_concurrent_requests=4)  # fmt: skip
    user = factories.user(tier)
    return user, str(ScopedTokenObtainPairSerializer.get_token(user).access_token)


def _chat(token: str, **extra) -> object:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    response = Client().post(
        "/v1/chat/completions", json.dumps({**body, **extra}), content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )  # fmt: skip
    if response.streaming:
        b"".join(response.streaming_content)  # the relay settles as the stream ends
    return response


@pytest.mark.parametrize("stream", [False, True])
def test_a_warm_gateway_request_reads_no_quota_row_from_the_database(stream):
    """Tier, quota, price and the token's user come from the config cache once warm."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    _user, token = _gateway_user()
    assert _chat(token, stream=stream).status_code == 200  # warm: rows read, month restored
    with CaptureQueriesContext(connection) as queries:
        response = _chat(token, stream=stream)
    assert response.status_code == 200
    assert "x-ratelimit-remaining-requests" in response
    assert queries.captured_queries == []


def test_the_guard_reads_nothing_from_the_database_once_warm(django_assert_num_queries):
    from llm_quota.quota.guard import quota_guard

    user, _token = _gateway_user()
    messages = [{"role": "user", "content": "hello there"}]
    for warm in (True, False):
        if warm:
            guard = quota_guard(user, model="gpt-4o", messages=messages, max_tokens=8).admit()
            guard.settle({"prompt_tokens": 10, "completion_tokens": 3})
            continue
        with django_assert_num_queries(0):
            guard = quota_guard(user, model="gpt-4o", messages=messages, max_tokens=8).admit()
            settlement = guard.settle({"prompt_tokens": 10, "completion_tokens": 3})
    assert settlement.settled and guard.finished


def test_settings_are_reread_after_an_override(settings):
    """``quota_settings`` keeps each value as an attribute; an override must drop it."""
    from llm_quota.conf import quota_settings

    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "MIN_OUTPUT_TOKENS": 7}
    assert quota_settings.MIN_OUTPUT_TOKENS == 7
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "MIN_OUTPUT_TOKENS": 9}
    assert quota_settings.MIN_OUTPUT_TOKENS == 9
    with pytest.raises(AttributeError):
        quota_settings.NOT_A_SETTING  # noqa: B018


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "gpt-4o", "input": "hi", "max_output_tokens": 5}),
        ("/v1/responses",
         {"model": "gpt-4o", "input": "hi", "max_output_tokens": 5, "stream": True}),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["hi", [1, 2, 3]]}),
        ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5,
                          "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5, "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}),
    ],
    ids=["responses", "responses-stream", "embeddings", "messages", "messages-stream"],
)  # fmt: skip
def test_every_gated_api_is_one_round_trip_to_reserve_and_one_to_settle(
    private_redis, monkeypatch, path, body
):
    client = private_redis.client()
    set_default_ledger(Ledger(client, prefix="hot"))
    factories.price("text-embedding-3-small", "1", "0")
    factories.price("claude-haiku-4-5", "1", "5")
    _user, token = _gateway_user()

    def post():
        response = Client().post(
            path, json.dumps(body), content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )  # fmt: skip
        if response.streaming:
            b"".join(response.streaming_content)  # the relay settles as the stream ends
        return response

    assert post().status_code == 200  # first request: scripts load, the user is restored
    sent: list[bytes] = []
    conn = client.connection_pool.get_connection()
    client.connection_pool.release(conn)
    original = type(conn).send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command if isinstance(command, bytes) else b"".join(command))
        return original(self, command, check_health)

    monkeypatch.setattr(type(conn), "send_packed_command", counting)
    assert post().status_code == 200
    monkeypatch.undo()
    assert len(sent) == 2
    assert all(b"EVALSHA" in command[:40] for command in sent)
