"""``ApiKeyAuthentication``: ``Authorization: Bearer llmq_...`` for DRF views.

Like DRF's ``TokenAuthentication``: a bearer that is not an API key is left to the
next authenticator (a JWT), so the two can be listed together; an API key that is
unknown, revoked or expired is refused (401 ``invalid_api_key``), never passed on.
``request.auth`` is the key's ``ApiKeyCredential``, which the scope permission and
admission read. A warm request makes no database query (``rules.api_keys``).
"""

from __future__ import annotations

import copy
from typing import Any

from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed

from llm_quota.rules.api_keys import ApiKeyCredential, find_key, looks_like_key

KEYWORD = "Bearer"


class InvalidApiKey(AuthenticationFailed):
    default_code = "invalid_api_key"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code=self.default_code)
        self.auth_header = f'{KEYWORD} realm="api"'


def bearer_key(request: Any) -> str | None:
    """The API key in ``Authorization: Bearer llmq_...``, else None (not ours)."""
    parts = get_authorization_header(request).split()
    if len(parts) != 2 or parts[0].lower() != KEYWORD.lower().encode():
        return None
    try:
        token = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return token if looks_like_key(token) else None


def credential_of(auth: Any) -> ApiKeyCredential | None:
    """The API key a request was authenticated with, if it was (``request.auth``)."""
    return auth if isinstance(auth, ApiKeyCredential) else None


class ApiKeyAuthentication(BaseAuthentication):
    """Authenticate ``Bearer llmq_...`` as the key's user; ``request.auth`` is the key."""

    def authenticate(self, request: Any) -> tuple[Any, ApiKeyCredential] | None:
        key = bearer_key(request)
        if key is None:
            return None
        credential = find_key(key)
        if credential is None:
            raise InvalidApiKey("Incorrect API key provided.")
        if credential.revoked:
            raise InvalidApiKey("This API key has been revoked.")
        if credential.expired():
            raise InvalidApiKey("This API key has expired.")
        if not credential.user.is_active:
            raise InvalidApiKey("The user of this API key is inactive.")
        # A copy per request: the cached instance is shared by every request of this
        # process, and a view may set attributes on request.user.
        return copy.copy(credential.user), credential

    def authenticate_header(self, request: Any) -> str:
        return f'{KEYWORD} realm="api"'


try:  # the OpenAPI schema is an optional extra (drf-spectacular)
    from drf_spectacular.extensions import OpenApiAuthenticationExtension
except ImportError:  # pragma: no cover
    pass
else:

    class ApiKeyScheme(OpenApiAuthenticationExtension):
        """Documents ``Bearer llmq_...`` in ``/api/schema/`` (registered by subclassing)."""

        target_class = ApiKeyAuthentication
        name = "apiKey"

        def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
            return {"type": "http", "scheme": "bearer", "bearerFormat": "llmq_..."}
