"""``LLMQuotaThrottle``: the gate as a DRF throttle.

Put it in a view's ``throttle_classes``; DRF runs it after authentication and the
permission classes, so an unauthenticated or out-of-scope caller is refused before
any Redis command. ``allow_request`` reserves through ``QuotaGuard``,
or raises the refusal (``RateLimited``/``BudgetExceeded`` are DRF ``Throttled``, so
DRF answers 429 with ``Retry-After``). Unlike DRF's throttles it never answers
``False``: a refusal carries the limit, the retry time and the upgrade.

After the request, the reservation must end exactly once. The admitted
``QuotaGuard`` is ``request.llm_quota``:

- the view sends ``request.llm_quota.max_tokens`` upstream (perhaps clamped) and
  calls ``request.llm_quota.settle(usage)`` (or ``settle_output(text)``) itself; or
- if it does not, ``LLMQuotaMiddleware`` finishes it once the response exists, by
  the release rule (``quota.release_rule``): settled from the response's ``usage``
  (an OpenAI-shaped body); released only where the ending proves that nothing was
  billed (an exception such as the provider's error answer, or an error status of
  4xx, 502 or 503), otherwise charged the estimate (a call that ran is never lost).

The rate-limit headers go on the response through the view's ``headers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from rest_framework.exceptions import NotAuthenticated
from rest_framework.permissions import SAFE_METHODS
from rest_framework.throttling import BaseThrottle

from llm_quota.conf import quota_settings
from llm_quota.drf.api_keys import credential_of
from llm_quota.drf.headers import headers_for, refusal_headers
from llm_quota.drf.permissions import granted_scopes
from llm_quota.exceptions import InsufficientScope, QuotaExceeded
from llm_quota.quota.guard import QuotaGuard
from llm_quota.shapes.chat import ChatRequest

#: Where the admitted guard hangs on the request (the Django ``HttpRequest``, which
#: DRF's ``Request`` proxies), for the view to use.
REQUEST_ATTRIBUTE = "llm_quota"
#: Where the throttle also hangs it, for ``LLMQuotaMiddleware`` to finish if the view
#: does not: the middleware finishes the throttle's reservations and no one else's.
THROTTLED_ATTRIBUTE = "_llm_quota_throttled"


def admission_headers(guard: QuotaGuard) -> Mapping[str, str]:
    """The rate-limit headers of an admitted request (the throttle, ``@quota_gated`` and
    the gateway put the same ones on its response), built once per request."""
    if guard.headers is None:
        guard.headers = MappingProxyType(headers_for(guard.decision, max_tokens=guard.max_tokens))
    return guard.headers


class LLMQuotaThrottle(BaseThrottle):
    """Reserve the OpenAI-shaped request body's estimate before the view runs.

    The admitted guard is ``request.llm_quota``; a refusal is raised (429 or 403 with
    the limit, ``retry_after`` and ``upgrade``), never answered ``False``.
    """

    #: The scope the caller needs; ``None`` reads ``LLM_QUOTA["CHAT_SCOPE"]``, ``""``
    #: skips the check (when the view's permissions already do it).
    required_scope: str | None = None

    def get_quota_request(self, request: Any, view: Any) -> dict[str, Any] | None:
        """What to price: keyword arguments for ``quota_guard``, or None to let it pass.

        The default reads an OpenAI Chat Completions JSON body (``model``,
        ``max_tokens``/``max_completion_tokens``, ``n`` and every billed field:
        ``shapes.chat.BILLED_FIELDS``) of any unsafe method; safe methods are not LLM
        calls. Override it for other bodies.
        """
        if request.method in SAFE_METHODS:
            return None
        return ChatRequest.from_body(request.data).quota_kwargs()

    def allow_request(self, request: Any, view: Any) -> bool:
        """Reserve, or raise the refusal. Never touches Redis for an anonymous caller."""
        params = self.get_quota_request(request, view)
        if params is None:
            return True
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            raise NotAuthenticated()
        scope = quota_settings.CHAT_SCOPE if self.required_scope is None else self.required_scope
        if scope and scope not in granted_scopes(request):
            raise InsufficientScope(f"This endpoint requires the scope {scope}.")
        # A caller authenticated by an API key: the key's limits are reserved with the user's.
        api_key = credential_of(getattr(request, "auth", None))
        team = request.headers.get("OpenAI-Organization") or None  # a team's slug
        guard = QuotaGuard(user, scope=scope, api_key=api_key, team=team, **params)
        try:
            guard.admit()
        except QuotaExceeded as exc:
            view.headers.update(refusal_headers(exc))
            raise
        django_request = getattr(request, "_request", request)
        setattr(django_request, REQUEST_ATTRIBUTE, guard)
        setattr(django_request, THROTTLED_ATTRIBUTE, guard)
        view.headers.update(admission_headers(guard))
        return True

    def wait(self) -> float | None:
        return None  # refusals are raised with their own Retry-After
