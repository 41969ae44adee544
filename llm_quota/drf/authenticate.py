"""DRF authentication outside DRF's views: ``@quota_gated`` and the async gateway.

Both wrap the Django request in DRF's ``Request`` with the authenticators they use,
then authenticate exactly as an ``APIView`` does, and on failure attach the
``WWW-Authenticate`` value an ``APIView`` would send with its 401
(``errors.response_for_exception`` reads it). Authenticators may read the database
(a user or a key not cached yet), so ``authenticate_plan`` first tries from memory
alone, and only on a miss runs ``authenticate`` as a ``Blocking`` step: in a thread
on an event loop. A warm async request thus never leaves the loop.
"""

from __future__ import annotations

from typing import Any, cast

from django.core.exceptions import SynchronousOnlyOperation
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed, NotAuthenticated
from rest_framework.request import Request

from llm_quota.ledger.plans import Plan
from llm_quota.quota.drivers import Blocking
from llm_quota.rules.config_cache import MustLoad, memory_only


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


def authenticate_plan(request: Request) -> Plan[tuple[Any, Any]]:
    """``authenticate``: here when every read it needs is cached, else as a ``Blocking``
    step. A miss stops the attempt before any query (``MustLoad``), and a query the
    caches don't cover (simplejwt's blacklist, say) is refused on an event loop by
    Django before it runs (``SynchronousOnlyOperation``): either way DRF has not set
    the user yet, and the second attempt starts afresh."""
    try:
        with memory_only():
            return authenticate(request)
    except (MustLoad, SynchronousOnlyOperation):
        pass
    return (yield Blocking(authenticate, (request,)))
