"""``@quota_gated`` checks CSRF for a caller of the session cookie, as DRF's
``SessionAuthentication`` does, and for nobody else: a browser sends the cookie to a
cross-site form's POST by itself, never a bearer token."""

from __future__ import annotations

import json

import pytest
from django.middleware.csrf import _get_new_csrf_string
from django.test import AsyncClient, Client

from tests.support import factories
from tests.support.gateway import MSGS, access_token
from tests.system.test_async_ledger import run_with_orm

pytestmark = [
    pytest.mark.django_db(transaction=True),  # the async view reads the session in a thread
    pytest.mark.urls("tests.integration.csrf_urls"),
]

BODY = json.dumps({"model": "gpt-4o", "messages": MSGS, "max_tokens": 20})
EVIL = {"Origin": "https://evil.example", "Referer": "https://evil.example/form"}


@pytest.fixture
def user(ledger):
    factories.price("gpt-4o", "1", "4")
    factories.tier("free", is_default=True, requests_per_minute=50)
    return factories.user()


def post(client, path, headers=None):
    """``client.post`` of a chat body; an ``AsyncClient`` is run on a loop of its own."""
    call = client.post(path, BODY, content_type="application/json", headers=headers)
    if isinstance(client, AsyncClient):

        async def main():
            return await call

        return run_with_orm(main)
    return call


def session_client(user, cls=Client, csrf_token: str | None = None):
    """A browser logged in as ``user`` whose CSRF checks are not switched off, as the
    test client's are by default."""
    client = cls(enforce_csrf_checks=True, raise_request_exception=False)
    client.force_login(user)
    if csrf_token is not None:
        client.cookies["csrftoken"] = csrf_token
    return client


def requests_made(ledger, user) -> int:
    return ledger.usage(user.pk).requests_this_minute


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("path", ["/gated", "/agated", "/exempted"])
def test_cookie_only_cross_site_post_is_refused_before_any_reservation(user, ledger, cls, path):
    response = post(session_client(user, cls), path, EVIL)
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["type"] == "permission_error" and error["message"].startswith("CSRF Failed")
    assert requests_made(ledger, user) == 0


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("path", ["/gated", "/agated", "/exempted"])
def test_session_post_with_its_csrf_token_is_gated(user, ledger, cls, path):
    token = _get_new_csrf_string()
    response = post(session_client(user, cls, token), path, {"X-CSRFToken": token})
    assert response.status_code == 200
    assert ledger.usage(user.pk).tokens_this_month == 5 + 3 * 4
    wrong = post(session_client(user, cls, token), path, {"X-CSRFToken": _get_new_csrf_string()})
    assert wrong.status_code == 403
    assert requests_made(ledger, user) == 1


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("path", ["/gated", "/agated"])
def test_bearer_token_caller_needs_no_csrf_token(user, ledger, cls, path):
    client = cls(enforce_csrf_checks=True, raise_request_exception=False)
    response = post(client, path, {"Authorization": f"Bearer {access_token(user)}", **EVIL})
    assert response.status_code == 200
    assert ledger.usage(user.pk).tokens_this_month == 5 + 3 * 4
