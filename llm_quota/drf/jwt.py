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

The token's signature is checked once per process, not on every request: a token
simplejwt validated is kept by its raw bytes (``ValidatedTokens``, bounded), and a
later request carrying the same bytes runs the checks the signature does not settle
on a copy of it, through the token class's own ``verify()``: the expiry against the
clock now, the token's id and type, and whatever a token class adds there (a
blacklist). A token those refuse is dropped and validated afresh by simplejwt, so
every refusal is simplejwt's own. Only tokens that passed are kept: a forged or
tampered one is never a hit, since its bytes differ.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any

from django.core.signals import setting_changed
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.tokens import Token
from rest_framework_simplejwt.utils import aware_utcnow

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


class ValidatedTokens:
    """Tokens simplejwt validated, by their raw bytes: at most ``size``, the least
    recently used dropped first (a process serves many users, each with a token or a
    few at a time)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._tokens: OrderedDict[bytes, Token] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, raw: bytes) -> Token | None:
        """A copy of the token kept for ``raw``, its clock set to now, or None. A copy:
        ``verify()`` reads the token's ``current_time``, and a view may change the
        payload of ``request.auth``."""
        with self._lock:
            token = self._tokens.get(raw)
            if token is None:
                return None
            self._tokens.move_to_end(raw)
        token = copy.copy(token)
        token.payload = dict(token.payload)
        token.current_time = aware_utcnow()
        return token

    def put(self, raw: bytes, token: Token) -> None:
        kept = copy.copy(token)
        kept.payload = dict(token.payload)  # not the one this request's view is handed
        with self._lock:
            self._tokens[raw] = kept
            self._tokens.move_to_end(raw)
            while len(self._tokens) > self.size:
                self._tokens.popitem(last=False)

    def drop(self, raw: bytes) -> None:
        with self._lock:
            self._tokens.pop(raw, None)

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


#: This process' validated tokens; a change of simplejwt's settings (its signing key, a
#: test's ``override_settings``) drops them.
validated_tokens = ValidatedTokens()


def _drop_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == "SIMPLE_JWT":
        validated_tokens.clear()


setting_changed.connect(_drop_on_change)


class CachedJWTAuthentication(JWTAuthentication):
    """``JWTAuthentication`` whose warm requests read no database and check no
    signature."""

    def get_validated_token(self, raw_token: bytes) -> Token:
        token = validated_tokens.get(raw_token)
        if token is not None:
            try:
                token.verify()  # the expiry (against now), id, type, a blacklist
                return token
            except TokenError:
                validated_tokens.drop(raw_token)  # refused below, in simplejwt's words
        token = super().get_validated_token(raw_token)
        validated_tokens.put(raw_token, token)
        return token

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
