"""DRF authentication outside DRF's views: ``@quota_gated`` and the async gateway.

Both wrap the Django request in DRF's ``Request`` with the authenticators they use,
then authenticate exactly as an ``APIView`` does, and on failure attach the
``WWW-Authenticate`` value an ``APIView`` would send with its 401
(``errors.response_for_exception`` reads it). Authenticators read the
database (simplejwt loads the token's user), so plans run ``authenticate`` as a
``Blocking`` step: in a thread on an event loop.
"""

from __future__ import annotations

from typing import Any, cast

from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed, NotAuthenticated
from rest_framework.request import Request


def api_key_as_bearer(request: Any) -> None:
    """Read ``x-api-key`` (how the ``anthropic`` SDK sends its key) as the bearer token,
    when no ``Authorization`` header came: the same credential, checked by the same
    authentication as every other ``/v1/`` request."""
    meta = request.META
    key = meta.get("HTTP_X_API_KEY")
    if key and not meta.get("HTTP_AUTHORIZATION"):
        meta["HTTP_AUTHORIZATION"] = f"Bearer {key}"


def _authenticate_header(request: Request) -> str | None:
    for authenticator in request.authenticators or ():
        # Never the test client's ForcedAuthentication here: these requests are built
        # with the configured authenticators.
        header = cast(BaseAuthentication, authenticator).authenticate_header(request)
        if header:
            return header
    return None


def authenticate(request: Request) -> tuple[Any, Any]:
    """The caller's ``(user, auth)``, or ``NotAuthenticated``/``AuthenticationFailed``."""
    try:
        user, auth = request.user, request.auth
    except AuthenticationFailed as exc:
        # The attribute DRF's APIView.handle_exception sets; the stubs don't declare it.
        exc.auth_header = _authenticate_header(request)  # type: ignore[attr-defined]
        raise
    if user is None or not user.is_authenticated:
        refused = NotAuthenticated()
        refused.auth_header = _authenticate_header(request)  # type: ignore[attr-defined]
        raise refused
    return user, auth
