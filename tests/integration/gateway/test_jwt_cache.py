"""A JWT's user from the config cache (``drf.jwt``): a warm gateway request makes no
SQL query on either view, and the async view no hop to a thread; a user saved (or
deleted) in this process is read afresh, and refused as simplejwt refuses it."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client, override_settings

from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
from llm_quota.drf.jwt import validated_tokens
from llm_quota.gateway import database
from llm_quota.ledger.config_broadcast import listener
from llm_quota.quota import drivers, pooled_connections
from llm_quota.rules.config_cache import config_cache
from tests.support import factories

pytestmark = pytest.mark.django_db

ASYNC_URLS = "tests.integration.gateway.async_gateway_urls"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def member(quota_prefix):
    factories.price("gpt-4o", "1", "4")
    tier = factories.tier("free", is_default=True, requests_per_minute=100,
                          tokens_per_month=10**6, max_concurrent_requests=4)  # fmt: skip
    return factories.user(tier)


def token_of(user) -> str:
    return str(ScopedTokenObtainPairSerializer.get_token(user).access_token)


def sync_chat(token: str, stream: bool = False):
    response = Client().post(
        "/v1/chat/completions", json.dumps({**BODY, "stream": stream}),
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}",
    )  # fmt: skip
    if response.streaming:
        b"".join(response.streaming_content)  # the relay settles as the stream ends
    return response


def async_chat(token: str, stream: bool = False):
    """The async view, driven from this thread: its thread-sensitive hops (the ORM)
    run back in this thread, where the test's connection counts the queries."""

    async def main():
        response = await AsyncClient().post(
            "/v1/chat/completions", json.dumps({**BODY, "stream": stream}),
            content_type="application/json", headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        if response.streaming:
            b"".join([part async for part in response.streaming_content])
        return response

    with override_settings(ROOT_URLCONF=ASYNC_URLS):
        return async_to_sync(main)()


CHATS = {"sync": sync_chat, "async": async_chat}


@pytest.fixture
def hops(monkeypatch):
    """The thread hops the async view's own code makes (plans' ``Blocking`` steps and
    ``ahand_back``), with the database taken as pooled so that ``ahand_back`` counts."""
    made: list[str] = []

    def counting(module):
        original = module.sync_to_async

        def wrapper(function, *args, **kwargs):
            made.append(getattr(function, "__name__", repr(function)))
            return original(function, *args, **kwargs)

        monkeypatch.setattr(module, "sync_to_async", wrapper)

    counting(drivers)
    counting(database)
    monkeypatch.setattr(database, "pooled", lambda: True)
    monkeypatch.setattr(pooled_connections, "pooled", lambda: True)
    original = pooled_connections.hand_back

    def handing_back():
        made.append("(handed back in the same hop)")
        original()

    monkeypatch.setattr(pooled_connections, "hand_back", handing_back)
    return made


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_warm_request_with_a_jwt_makes_no_sql_query(
    member, view, stream, django_assert_num_queries
):
    chat, token = CHATS[view], token_of(member)
    assert chat(token, stream).status_code == 200  # cold: user, tier, price load
    # This test's KEY_PREFIX is new: the listener subscribes afresh, dropping the cache.
    assert listener.subscribed.wait(5)
    assert chat(token, stream).status_code == 200
    with django_assert_num_queries(0):
        assert chat(token, stream).status_code == 200


def test_a_warm_async_request_makes_no_hop_to_a_thread_and_a_cold_one_hands_back_at_once(
    member, hops
):
    token = token_of(member)
    assert async_chat(token).status_code == 200
    assert listener.subscribed.wait(5)
    config_cache.invalidate()  # as a save anywhere does
    hops.clear()
    assert async_chat(token).status_code == 200
    # The ORM ran in the authentication's hop, and its connection went back to the pool
    # in that same hop, not at the request's end in one more.
    assert hops[:2] == ["authenticate", "(handed back in the same hop)"]
    assert "hand_back" not in hops
    hops.clear()
    assert async_chat(token).status_code == 200
    assert hops == []


@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_deactivated_user_is_refused_on_the_next_request_as_simplejwt_refuses(
    member, view
):
    chat, token = CHATS[view], token_of(member)
    assert chat(token).status_code == 200
    assert chat(token).status_code == 200  # served from the cache
    member.is_active = False
    member.save()
    refused = chat(token)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Invalid API key: User is inactive"


@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_deleted_user_is_refused_on_the_next_request(member, view):
    chat, token = CHATS[view], token_of(member)
    assert chat(token).status_code == 200
    member.delete()
    refused = chat(token)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Invalid API key: User not found"


def test_a_login_does_not_drop_the_cached_user(member, django_assert_num_queries):
    from django.contrib.auth.models import update_last_login

    token = token_of(member)
    assert sync_chat(token).status_code == 200
    assert listener.subscribed.wait(5)
    assert sync_chat(token).status_code == 200
    update_last_login(None, member)
    with django_assert_num_queries(0):
        assert sync_chat(token).status_code == 200


@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_bad_token_is_refused_without_a_query(member, view, django_assert_num_queries):
    with django_assert_num_queries(0):
        refused = CHATS[view]("not-a-jwt")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"]


# -- the signature checked once per process (``drf.jwt.ValidatedTokens``) ---------------


def short_lived_token(user, seconds: float) -> str:
    from datetime import timedelta

    token = ScopedTokenObtainPairSerializer.get_token(user).access_token
    token.set_exp(lifetime=timedelta(seconds=seconds))
    return str(token)


@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_cached_token_is_not_decoded_again(member, view, monkeypatch):
    from rest_framework_simplejwt.backends import TokenBackend

    decoded: list[object] = []
    original = TokenBackend.decode

    def counting(self, token, verify=True):
        decoded.append(token)
        return original(self, token, verify=verify)

    monkeypatch.setattr(TokenBackend, "decode", counting)
    token = token_of(member)
    for _ in range(3):
        assert CHATS[view](token).status_code == 200
    assert len(decoded) == 1


@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_cached_token_is_refused_once_it_expires(member, view):
    import time

    token = short_lived_token(member, 1.5)
    assert CHATS[view](token).status_code == 200  # validated, kept
    assert CHATS[view](token).status_code == 200  # a hit
    time.sleep(1.6)
    refused = CHATS[view](token)
    assert refused.status_code == 401
    validated_tokens.clear()
    assert CHATS[view](token).json() == refused.json()  # as simplejwt refuses it uncached


@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_tampered_copy_of_a_cached_token_is_refused(member, view):
    import base64

    token = token_of(member)
    assert CHATS[view](token).status_code == 200  # the genuine one is cached
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["user_id"] = str(int(claims["user_id"]) + 1)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for tampered in (f"{head}.{forged}.{signature}", f"{head}.{payload}.{flipped}"):
        assert CHATS[view](tampered).status_code == 401


def test_the_validated_tokens_are_bounded_least_recently_used_first():
    from rest_framework_simplejwt.tokens import AccessToken

    from llm_quota.drf.jwt import ValidatedTokens

    kept = ValidatedTokens(size=2)
    tokens = {raw: AccessToken() for raw in (b"a", b"b", b"c")}
    kept.put(b"a", tokens[b"a"])
    kept.put(b"b", tokens[b"b"])
    assert kept.get(b"a") is not None  # now the most recently used
    kept.put(b"c", tokens[b"c"])
    assert len(kept) == 2
    assert kept.get(b"b") is None
    assert kept.get(b"a") is not None and kept.get(b"c") is not None


def test_a_view_changing_its_token_does_not_change_the_cached_one():
    from rest_framework_simplejwt.tokens import AccessToken

    from llm_quota.drf.jwt import ValidatedTokens

    kept = ValidatedTokens()
    token = AccessToken()
    kept.put(b"t", token)
    token["scope"] = "changed by the first request's view"
    served = kept.get(b"t")
    assert served is not None and "scope" not in served
    served["scope"] = "changed by the second's"
    assert "scope" not in kept.get(b"t")
