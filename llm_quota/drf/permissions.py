"""``HasScope``: a DRF permission for the JWT ``scope`` claim.

A view lists ``required_scopes``. A JWT caller has the scopes in its token's claim,
*intersected* with its tier's scopes now, so blocking a user or moving them to a
smaller tier takes effect before their token expires. A caller authenticated any
other way (session, DRF token) has its tier's scopes; an API key caller the key's
scopes, intersected with its tier's the same way. Nothing here touches Redis.
A claim that is neither a string nor a list of strings is a malformed credential:
401, and no scope granted (``MalformedScopeClaim``).

``scopes_plan`` and ``require_scopes`` are the same check for code outside DRF's
views (the async gateway, ``@quota_gated``), which cannot run a DRF permission class.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission
from rest_framework_simplejwt.settings import api_settings as jwt_settings

from llm_quota.conf import quota_settings
from llm_quota.ledger.plans import Plan
from llm_quota.quota.access import refuse_blocked, require_scopes
from llm_quota.quota.admission import policy_plan
from llm_quota.quota.drivers import run
from llm_quota.rules.api_keys import ApiKeyCredential, key_scopes
from llm_quota.rules.policy import UserPolicy


def _claim(auth: Any) -> Any:
    if auth is None:
        return None
    payload = getattr(auth, "payload", None)  # simplejwt tokens
    if isinstance(payload, dict):
        return payload.get(quota_settings.SCOPE_CLAIM)
    if isinstance(auth, dict):
        return auth.get(quota_settings.SCOPE_CLAIM)
    return None


class MalformedScopeClaim(AuthenticationFailed):
    """401: the token's scope claim is neither a space-separated string (RFC 8693's
    ``scope``) nor a list of strings. The token is signed, so its issuer made it that
    way: it is a bad credential (RFC 6750 ``invalid_token``), not a bad request body,
    and it grants nothing. Answered like any invalid token, with the bearer challenge."""

    default_code = "malformed_scope_claim"

    def __init__(self) -> None:
        super().__init__(
            f"The token's '{quota_settings.SCOPE_CLAIM}' claim must be a space-separated "
            "string of scopes (or a list of strings)."
        )
        self.auth_header = f'{jwt_settings.AUTH_HEADER_TYPES[0]} realm="api"'


def _token_scopes(claim: Any) -> set[str]:
    if isinstance(claim, str):
        return set(claim.split())
    if isinstance(claim, list | tuple) and all(isinstance(scope, str) for scope in claim):
        return set(claim)
    raise MalformedScopeClaim()


def _scopes(policy: UserPolicy, auth: Any) -> set[str]:
    tier_scopes = set(policy.scopes)
    if isinstance(auth, ApiKeyCredential):  # an API key: its scopes, within the tier's
        return key_scopes(auth, tier_scopes)
    claim = _claim(auth)
    if claim is None:
        return tier_scopes
    return _token_scopes(claim) & tier_scopes


def scopes_plan(user: Any, auth: Any) -> Plan[set[str]]:
    """The scopes the caller holds right now (the tier from memory, else the database).

    A blocked user holds none, and is refused as blocked (``QuotaBlocked``, 403
    ``user_blocked``) rather than as out of scope, on every path that asks."""
    if user is None or not user.is_authenticated:
        return set()
    policy = yield from policy_plan(user)
    refuse_blocked(policy)
    return _scopes(policy, auth)


def granted_scopes(request: Any) -> set[str]:
    """The scopes ``request``'s caller holds right now."""
    return run(scopes_plan(getattr(request, "user", None), getattr(request, "auth", None)))


class HasScope(BasePermission):
    """Allow only callers holding every scope in the view's ``required_scopes``."""

    def has_permission(self, request: Any, view: Any) -> bool:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return False  # DRF answers 401 (or 403 without an authenticate header)
        require_scopes(getattr(view, "required_scopes", ()) or (), granted_scopes(request))
        return True
