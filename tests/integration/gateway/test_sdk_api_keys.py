"""The official openai SDK with ``api_key="llmq_..."`` through the gateway, sync and
async views, streaming included: charged to the key and its user, refused by the key's
own limits in the SDK's own exceptions."""

from __future__ import annotations

import openai
import pytest

from llm_quota.ledger.default import get_ledger
from tests.support import factories
from tests.support.api_keys import api_key
from tests.support.gateway import MSGS

pytestmark = pytest.mark.django_db(transaction=True)


def _client(gateway, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    gateway.clients.append(client)
    return client


def test_the_sdk_chats_and_streams_with_an_api_key(either_gateway):
    factories.tier("free", is_default=True, requests_per_minute=100, tokens_per_month=10**6)
    user = factories.user()
    key, plaintext = api_key(user, tokens_per_day=100_000)
    client = _client(either_gateway, plaintext)
    reply = client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=20)
    assert reply.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=MSGS, max_tokens=20, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks and chunks[-1].usage is not None
    ledger = get_ledger()
    used = ledger.key_usage(user.pk, key.pk)
    assert used.requests == 2 and used.reserved == 0
    assert used.tokens_today == ledger.usage(user.pk).tokens_today > 0


def test_the_sdk_sees_a_key_limit_as_a_rate_limit_error(either_gateway):
    factories.tier("free", is_default=True, tokens_per_month=10**6)
    _key, plaintext = api_key(factories.user(), requests_per_minute=1)
    client = _client(either_gateway, plaintext)
    client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
    assert "key.requests_per_minute" in str(refused.value)
    assert refused.value.response.headers["x-ratelimit-limit-requests"] == "1"


def test_the_sdk_gets_an_authentication_error_for_a_revoked_key(either_gateway):
    from django.utils import timezone

    factories.tier("free", is_default=True, tokens_per_month=10**6)
    key, plaintext = api_key(factories.user())
    client = _client(either_gateway, plaintext)
    client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
    key.revoked_at = timezone.now()
    key.save()
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
    assert refused.value.code == "invalid_api_key"


def test_the_sdk_with_a_key_and_organization_charges_the_team_streaming_included(either_gateway):
    from llm_quota.models import Team, TeamMembership

    factories.tier("free", is_default=True, tokens_per_month=10**6)
    team_tier = factories.tier("team", tokens_per_month=10**6)
    acme = Team.objects.create(slug="acme", name="Acme", tier=team_tier)
    other = Team.objects.create(slug="other", name="Other", tier=team_tier)
    user = factories.user()
    for team in (acme, other):
        TeamMembership.objects.create(team=team, user=user)
    _key, plaintext = api_key(user)
    client = openai.OpenAI(
        base_url=either_gateway.base_url, api_key=plaintext, organization="acme", max_retries=0
    )
    either_gateway.clients.append(client)
    client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=20)
    chunks = list(
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=20, stream=True)
    )
    assert chunks
    ledger = get_ledger()
    team = ledger.team_usage(acme.pk)
    assert [m.requests for m in team.by_member] == [2] and team.reserved == 0
    assert team.tokens_this_month == ledger.usage(user.pk).tokens_this_month > 0
    assert ledger.team_usage(other.pk).tokens_this_month == 0
    stranger = openai.OpenAI(
        base_url=either_gateway.base_url, api_key=plaintext, organization="nope", max_retries=0
    )
    either_gateway.clients.append(stranger)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        stranger.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
    assert refused.value.code == "team_not_allowed"
