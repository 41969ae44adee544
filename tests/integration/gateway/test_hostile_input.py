"""Input built to break the gateway: each case is a client error in the contract's shape
(400, or 401 for a credential), never a 500, on the sync and the async view alike, and
nothing stays reserved afterwards (most are refused before anything is reserved)."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from django.test import Client
from rest_framework.exceptions import ParseError
from rest_framework_simplejwt.tokens import RefreshToken

from llm_quota.drf.parsers import JSONParser
from llm_quota.shapes.chat import ChatRequest
from llm_quota.shapes.json_limits import MAX_NESTING
from tests.integration.gateway.test_async_view import (
    BODY,
    _auth,
    async_post,
    nothing_held,
    sync_post,
)
from tests.support import factories
from tests.support.gateway import access_token

pytestmark = pytest.mark.django_db(transaction=True)

VIEWS = {"sync": sync_post, "async": async_post}


@pytest.fixture
def free():
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=200)
    factories.price("up-*", "1", "2", default_max_output_tokens=100)
    return factories.tier("free", is_default=True, requests_per_minute=50)


def nested(depth: int) -> str:
    """A JSON array ``depth`` levels deep."""
    return "[" * depth + "]" * depth


def raw_body(extra: str) -> bytes:
    """``BODY`` with one more field, ``metadata``, written as raw JSON text."""
    return (json.dumps(BODY)[:-1] + f', "metadata": {extra}}}').encode()


def assert_refused_before_admission(ledger, user, response, status=400) -> dict:
    """The contract's error shape, and nothing was admitted (so nothing is reserved)."""
    assert response.status_code == status, response.body[:300]
    error = json.loads(response.body)["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    live = ledger.usage(user.pk)
    assert live.requests_this_minute == 0 and live.reserved == 0 and live.in_flight == 0
    return error


# -- bodies that cannot be parsed or sent ------------------------------------------------


@pytest.mark.parametrize("view", VIEWS)
def test_json_nested_a_thousand_deep_is_400_not_a_parser_crash(ledger, free, view):
    user = factories.user()
    response = VIEWS[view](raw_body(nested(1_000)), _auth(user))
    error = assert_refused_before_admission(ledger, user, response)
    assert error["type"] == "invalid_request_error"


def test_the_json_parser_turns_a_recursion_error_into_a_parse_error():
    with pytest.raises(ParseError):
        JSONParser().parse(io.BytesIO(b"[" * 100_000))


@pytest.mark.parametrize("view", VIEWS)
def test_a_field_nested_too_deep_to_copy_is_400_before_anything_is_reserved(ledger, free, view):
    """Deep enough to parse, too deep for the upstream body's deepcopy."""
    user = factories.user()
    response = VIEWS[view](raw_body(nested(800)), _auth(user))
    error = assert_refused_before_admission(ledger, user, response)
    assert error["type"] == "invalid_request_error" and error["param"] == "metadata"
    assert str(MAX_NESTING) in error["message"]


def test_nesting_up_to_the_bound_is_accepted_and_one_more_level_is_not():
    body = {**BODY, "response_format": {"type": "json_schema"}}
    innermost: dict = {"type": "string"}
    schema = innermost
    for _ in range(MAX_NESTING - 4):  # body, response_format, json_schema, schema: 4 levels
        schema = {"items": schema}
    body["response_format"]["json_schema"] = {"schema": schema}
    ChatRequest.from_body(body)  # exactly MAX_NESTING levels deep
    innermost["items"] = {}  # one more level (an empty object still counts)
    with pytest.raises(Exception) as info:
        ChatRequest.from_body(body)
    assert info.value.status_code == 400 and info.value.param == "response_format"


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize(
    "where",
    ["content", "key", "tools"],
)
def test_a_lone_surrogate_is_400_before_it_reaches_the_upstream(
    upstream, ledger, free, view, where
):
    user = factories.user()
    text = json.dumps({**BODY, "model": "up-normal"})
    surrogate = '"x\\ud800y"'
    if where == "content":
        payload = text.replace('"Say hello in five words."', surrogate)
    elif where == "key":
        payload = text[:-1] + f', "metadata": {{{surrogate}: 1}}}}'
    else:
        payload = (
            text[:-1]
            + f', "tools": [{{"type": "function", "function": {{"name": {surrogate}}}}}]}}'
        )
    response = VIEWS[view](payload.encode(), _auth(user))
    error = assert_refused_before_admission(ledger, user, response)
    assert error["type"] == "invalid_request_error" and "surrogate" in error["message"]
    assert upstream.requests == []


@pytest.mark.parametrize("view", VIEWS)
def test_a_surrogate_pair_is_a_character_not_an_error(upstream, ledger, free, view):
    user = factories.user()
    text = json.dumps({**BODY, "model": "up-normal"}).replace("five words.", "five \\ud83d\\ude00.")
    response = VIEWS[view](text.encode(), _auth(user))
    assert response.status_code == 200
    assert upstream.requests[-1]["messages"][0]["content"] == "Say hello in five \U0001f600."
    nothing_held(ledger, user)


# -- a failure building the upstream body, after admission ------------------------------


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize(
    "failure, status, kind",
    [(RecursionError, 400, "invalid_request_error"), (RuntimeError, 500, "server_error")],
)
def test_a_failure_building_the_upstream_body_releases_and_answers_in_openai_shape(
    ledger, free, monkeypatch, view, failure, status, kind
):
    def broken(self, max_tokens, cap_field=""):
        raise failure("cannot build this body")

    monkeypatch.setattr(ChatRequest, "upstream_body", broken)
    user = factories.user()
    response = VIEWS[view](BODY, _auth(user))
    assert response.status_code == status
    assert json.loads(response.body)["error"]["type"] == kind
    assert response["x-ratelimit-limit-requests"] == "50"  # an admitted call's headers
    nothing_held(ledger, user)
    live = ledger.usage(user.pk)
    assert live.requests_this_minute == 1 and live.tokens_this_month == 0  # released


# -- credentials -------------------------------------------------------------------------


def test_a_refresh_token_of_a_deleted_user_is_401(ledger, free):
    user = factories.user()
    refresh = str(RefreshToken.for_user(user))
    user.delete()
    response = Client(raise_request_exception=False).post(
        "/api/token/refresh/", {"refresh": refresh}, content_type="application/json"
    )
    assert response.status_code == 401, response.content
    assert response.json() == {"detail": "No active account found for the given token."}


def _token_with_scope(user, scope) -> dict[str, str]:
    token = RefreshToken.for_user(user).access_token
    token["scope"] = scope
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("scope", [7, ["llm:chat", 7], {"llm:chat": True}, 1.5, True])
def test_a_malformed_scope_claim_is_401_invalid_token_never_a_grant(ledger, free, view, scope):
    user = factories.user()
    response = VIEWS[view](BODY, _token_with_scope(user, scope))
    error = assert_refused_before_admission(ledger, user, response, status=401)
    assert error["code"] == "invalid_api_key" and "scope" in error["message"]
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("view", VIEWS)
def test_a_list_of_scopes_is_still_a_valid_claim(ledger, free, view):
    user = factories.user()
    response = VIEWS[view](BODY, _token_with_scope(user, ["llm:chat", "usage:read"]))
    assert response.status_code == 200
    nothing_held(ledger, user)


def test_a_malformed_scope_claim_is_401_on_the_usage_api_too(ledger, free):
    user = factories.user()
    response = Client(raise_request_exception=False).get(
        "/api/llm-quota/usage/", headers=_token_with_scope(user, 7)
    )
    assert response.status_code == 401, response.content


@pytest.mark.parametrize(
    "extra",
    [nested(1_000), nested(800), nested(100_000), '"\\udfff"'],
    ids=["1000 deep", "800 deep", "100000 deep", "lone surrogate"],
)
def test_hostile_bodies_are_400_under_real_servers_too(either_gateway, upstream, extra):
    """The live server's threads and uvicorn's loop have stacks of their own depth."""
    factories.tier("free", is_default=True)
    user = factories.user()
    response = httpx.post(
        either_gateway.base_url + "/chat/completions",
        content=raw_body(extra),
        headers={"Authorization": f"Bearer {access_token(user)}",
                 "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["type"] == "invalid_request_error"
    live = either_gateway.usage(user)
    assert live.requests_this_minute == 0 and live.reserved == 0 and upstream.requests == []
