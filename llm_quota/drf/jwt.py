"""``CachedJWTAuthentication``: simplejwt's ``JWTAuthentication`` with its user read
from the per-process config cache, as API keys read theirs (``rules.api_keys``).

simplejwt reads the token's user from the database on every request; on the async
gateway that read is also a hop to a thread. Here the token is validated exactly as
simplejwt does, and simplejwt's own ``get_user`` runs every check (the user-id
claim, user not found, inactive, password changed) on a copy of the cached user.
A save of the user other than a login's ``last_login``, and a delete, drop the
cache in every process (``ledger/config_broadcast.py``), so a user deactivated in
one process is refused on the next request in any other; ``CONFIG_CACHE_SECONDS``
bounds the entry's life if that announcement is missed. A user that does not exist
is not cached (only signed tokens get here, but the cache must not fill up).
"""

from __future__ import annotations

import copy
from typing import Any

from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.tokens import Token

from llm_quota.rules.config_cache import MISSING, config_cache, ensure_may_load


class _CachedUsers:
    """Stands in for the user model in simplejwt's ``get_user``: ``objects.get`` reads
    the config cache, so every check of simplejwt's stays simplejwt's."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.objects = self
        self.DoesNotExist = model.DoesNotExist

    def get(self, **lookup: Any) -> Any:
        ((field, value),) = lookup.items()
        key = ("jwt-user", field, value)
        user = config_cache.peek(key)
        if user is MISSING:
            ensure_may_load()
            user = self.model.objects.get(**lookup)  # as simplejwt; DoesNotExist: not cached
            user = config_cache.get(key, lambda: user)
        # A copy per request: the cached instance is shared by every request of this
        # process, and a view may set attributes on request.user.
        return copy.copy(user)


class CachedJWTAuthentication(JWTAuthentication):
    """``JWTAuthentication`` whose warm requests read no database."""

    def get_user(self, validated_token: Token) -> Any:
        model = self.user_model
        self.user_model = _CachedUsers(model)  # type: ignore[assignment]
        try:
            return super().get_user(validated_token)
        finally:
            self.user_model = model


try:  # the OpenAPI schema is an optional extra (drf-spectacular)
    from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme
    from drf_spectacular.drainage import set_override
except ImportError:  # pragma: no cover
    pass
else:
    # The same bearer scheme as simplejwt's: where a host's own views keep simplejwt's
    # class and the gateway uses this one, both are the one ``jwtAuth`` component, so
    # drf-spectacular's warning about two classes under one name does not apply.
    set_override(CachedJWTAuthentication, "suppress_collision_warning", True)

    class CachedJWTScheme(SimpleJWTScheme):
        """Documents it in ``/api/schema/`` as simplejwt's bearer (registered by subclassing)."""

        target_class = "llm_quota.drf.jwt.CachedJWTAuthentication"
