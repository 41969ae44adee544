"""API keys as a request sees them: a credential read from the config cache, and what
it changes in its user's policy (contract section 9).

A key is found by its prefix and proven by its hash, compared in constant time. The
row (and its user) is cached per process like tiers are, so a warm request with a key
reads no database; a save of the key (a revocation) drops every process' cache
(``ledger/config_broadcast.py``), and expiry is checked against the clock each time.
No Redis, no HTTP.
"""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone

from llm_quota.models import API_KEY_PREFIX, API_KEY_PREFIX_CHARS, hash_api_key
from llm_quota.rules.config_cache import MISSING, config_cache, ensure_may_load
from llm_quota.rules.policy import UserPolicy

#: Longer than any key ``ApiKey.issue`` makes; a longer bearer is not looked up.
MAX_KEY_LENGTH = 128


@dataclass(frozen=True)
class ApiKeyCredential:
    """The cached form of an ``ApiKey``: what ``request.auth`` holds for a key caller."""

    id: int
    user: Any
    prefix: str
    key_hash: str
    #: The key's own scopes; None: its tier's.
    scopes: tuple[str, ...] | None
    expires_at: datetime | None
    revoked: bool
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    #: The team the key's requests are charged to (contract section 10), or None.
    team_id: int | None = None

    @property
    def user_id(self) -> Any:
        return self.user.pk

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    def usable(self) -> bool:
        return not self.revoked and not self.expired() and self.user.is_active


def looks_like_key(token: str) -> bool:
    return token.startswith(API_KEY_PREFIX) and len(token) <= MAX_KEY_LENGTH


def _load(prefix: str) -> ApiKeyCredential | None:
    from llm_quota.models import ApiKey

    row = ApiKey.objects.select_related("user").filter(prefix=prefix).first()
    if row is None:
        return None
    return ApiKeyCredential(
        id=row.pk,
        user=row.user,
        prefix=row.prefix,
        key_hash=row.key_hash,
        scopes=tuple(row.scope_list) if row.scopes.strip() else None,
        expires_at=row.expires_at,
        revoked=row.revoked_at is not None,
        requests_per_minute=row.requests_per_minute,
        tokens_per_day=row.tokens_per_day,
        tokens_per_month=row.tokens_per_month,
        team_id=row.team_id,
    )


def find_key(key: str) -> ApiKeyCredential | None:
    """The credential ``key`` proves, usable or not, or None for no such key.

    Only keys that exist are cached: a flood of made-up keys costs one indexed query
    each (as a bad JWT costs a signature check) and cannot fill the config cache,
    whose overflow would drop every tier and price with it."""
    if not looks_like_key(key):
        return None
    prefix = key[: len(API_KEY_PREFIX) + API_KEY_PREFIX_CHARS]
    credential = config_cache.peek(("api-key", prefix))
    if credential is MISSING:
        ensure_may_load()
        credential = _load(prefix)
        if credential is None:
            return None
        credential = config_cache.get(("api-key", prefix), lambda: credential)
    if not hmac.compare_digest(hash_api_key(key), credential.key_hash):
        return None
    return credential


def key_scopes(credential: ApiKeyCredential, tier_scopes: set[str]) -> set[str]:
    """A key never holds more than its user's tier grants now."""
    if credential.scopes is None:
        return set(tier_scopes)
    return set(credential.scopes) & tier_scopes


def with_key(policy: UserPolicy, credential: ApiKeyCredential | None) -> UserPolicy:
    """``policy`` for a request made with ``credential``: the key's limits join the
    user's, to be reserved in the same step; its scopes narrow the tier's."""
    if credential is None:
        return policy
    limits = dataclasses.replace(
        policy.limits,
        api_key=str(credential.id),
        key_requests_per_minute=credential.requests_per_minute,
        key_tokens_per_day=credential.tokens_per_day,
        key_tokens_per_month=credential.tokens_per_month,
    )
    scopes = tuple(sorted(key_scopes(credential, set(policy.scopes))))
    return dataclasses.replace(policy, limits=limits, scopes=scopes)
