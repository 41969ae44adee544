"""A whole gateway request (JWT, scope, throttle, upstream, settle) costs Redis exactly
two round trips: one EVALSHA to reserve, one to settle. Counted on a private server's
connection, so nothing else's commands blur the figure."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from llm_quota.redis_ledger import Ledger, set_default_ledger
from llm_quota.tokens import ScopedTokenObtainPairSerializer
from tests import factories

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
