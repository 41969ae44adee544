"""JWT scopes: tokens carry the tier's scopes; HasScope enforces them without Redis."""

from __future__ import annotations

import pytest
from rest_framework.response import Response
from rest_framework.test import APIClient, APIRequestFactory, force_authenticate
from rest_framework.views import APIView
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.tokens import AccessToken

from llm_quota.drf.permissions import HasScope
from llm_quota.models import UserQuota
from tests.support import factories

pytestmark = pytest.mark.django_db


class ChatView(APIView):
    authentication_classes = [JWTAuthentication]
    permission_classes = [HasScope]
    required_scopes = ["llm:chat"]

    def get(self, request):
        return Response({"ok": True})


def obtain(username):
    client = APIClient()
    response = client.post("/api/token/", {"username": username, "password": "pw-123456"})
    assert response.status_code == 200, response.content
    return response.json()


def call(access):
    request = APIRequestFactory().get("/x", HTTP_AUTHORIZATION=f"Bearer {access}")
    return ChatView.as_view()(request)


def test_access_token_carries_tier_scopes_and_passes():
    tier = factories.tier("free", is_default=True, scopes="llm:chat usage:read")
    user = factories.user(tier)
    tokens = obtain(user.username)
    assert AccessToken(tokens["access"])["scope"] == "llm:chat usage:read"
    assert call(tokens["access"]).status_code == 200


def test_missing_scope_is_403_insufficient_scope():
    tier = factories.tier("reader", is_default=True, scopes="usage:read")
    user = factories.user(tier)
    response = call(obtain(user.username)["access"])
    assert response.status_code == 403
    assert response.data["detail"].code == "insufficient_scope"


def test_blocking_takes_effect_before_the_token_expires_and_refresh_drops_scopes():
    tier = factories.tier("free", is_default=True)
    user = factories.user(tier)
    tokens = obtain(user.username)
    UserQuota.objects.filter(user=user).update(blocked=True)
    UserQuota.objects.get(user=user).save()  # admin save: invalidates the policy cache
    refused = call(tokens["access"])
    assert refused.status_code == 403
    assert refused.data["detail"].code == "user_blocked"  # not insufficient_scope
    refreshed = APIClient().post("/api/token/refresh/", {"refresh": tokens["refresh"]}).json()
    assert AccessToken(refreshed["access"])["scope"] == ""


def test_unauthenticated_and_tampered_tokens_are_401():
    factories.tier("free", is_default=True)
    assert ChatView.as_view()(APIRequestFactory().get("/x")).status_code == 401
    user = factories.user()
    access = obtain(user.username)["access"]
    tampered = access[:-4] + ("AAAA" if not access.endswith("AAAA") else "BBBB")
    assert call(tampered).status_code == 401


def test_session_callers_use_their_tier_scopes():
    factories.tier("free", is_default=True, scopes="llm:chat")
    user = factories.user()
    request = APIRequestFactory().get("/x")
    force_authenticate(request, user=user)

    class SessionView(ChatView):
        authentication_classes = []

    assert SessionView.as_view()(request).status_code == 200
