"""``LLMQuotaMiddleware``: finishes the reservations nobody settled.

``LLMQuotaThrottle`` admits a call before a DRF view runs, and the view may settle it
(``request.llm_quota.settle(usage)``) or not. Once the response exists, this
middleware finishes a throttled reservation the view left open, the way
``@quota_gated`` finishes its own (``decorators.finish``), by the release rule
(``quota.release_rule``): settled from the response's OpenAI ``usage``; an exception
the view raised (seen in ``process_exception``) released only where it proves that
the upstream billed nothing, else charged the estimate; an error status released for
4xx (the view, or a later check such as another throttle, refused), 502 and 503, and
charged the estimate for 500, 504 and other 5xx; otherwise charged the estimate; a
streamed response when Django closes it. It touches nothing else: the gateway views
and ``@quota_gated`` own their reservations from admission to settle.

Add it to ``MIDDLEWARE`` (any position). It is sync and async capable: under ASGI it
runs as a coroutine, on the guard's async methods, so Django does not hop to a thread
for it on every request.

``from llm_quota.middleware import quota_gated`` still works, deprecated: the
decorator lives in ``llm_quota.decorators``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from llm_quota import decorators
from llm_quota.drf.headers import refusal_headers
from llm_quota.drf.throttling import THROTTLED_ATTRIBUTE
from llm_quota.exceptions import QuotaExceeded, RefusalBody
from llm_quota.quota.guard import QuotaGuard


def __getattr__(name: str) -> Any:
    if name == "quota_gated":
        warnings.warn(
            "llm_quota.middleware.quota_gated is deprecated; import it from llm_quota.decorators.",
            DeprecationWarning,
            stacklevel=2,
        )
        return decorators.quota_gated
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Where ``process_exception`` keeps what a throttled view raised, for the release rule.
RAISED_ATTRIBUTE = "_llm_quota_raised"


def _throttled(request: HttpRequest) -> QuotaGuard | None:
    guard = getattr(request, THROTTLED_ATTRIBUTE, None)
    return guard if isinstance(guard, QuotaGuard) else None


def _raised(request: HttpRequest) -> BaseException | None:
    return getattr(request, RAISED_ATTRIBUTE, None)


#: Hooks the middleware offered when it also gated plain views; a subclass that still
#: defines one is told where that job went, rather than having it silently ignored.
RETIRED_HOOKS = ("get_quota_request", "get_authenticators", "authenticate", "admit")


class LLMQuotaMiddleware:
    """Finish, by the release rule, a throttled reservation the view left open.

    Also answers a quota refusal that escapes a plain view as 429 (not 500) and adds
    the rate-limit headers DRF's exception handler does not know.
    """

    sync_capable = True
    async_capable = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        retired = [name for name in RETIRED_HOOKS if name in vars(cls)]
        if retired:
            warnings.warn(
                f"{cls.__qualname__} overrides {', '.join(retired)}, which LLMQuotaMiddleware "
                "no longer calls: plain views are gated by @llm_quota.decorators.quota_gated "
                "(price other bodies with quota_gated(quota_request=...)).",
                DeprecationWarning,
                stacklevel=2,
            )

    def __init__(self, get_response: Callable[..., Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        response = _with_refusal_headers(self.get_response(request))
        guard = _throttled(request)
        return response if guard is None else decorators.finish(guard, response, _raised(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = _with_refusal_headers(await self.get_response(request))
        guard = _throttled(request)
        if guard is None:
            return response
        return await decorators.afinish(guard, response, _raised(request))

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponseBase | None:
        """Remember what a throttled view raised: Django answers it with a 500, but
        whether the reservation is released depends on the exception itself.

        A plain view that let a ``quota_guard`` refusal escape is answered as a DRF view
        would answer it (429, ``RefusalBody``, its headers), not with a 500."""
        if _throttled(request) is not None:
            setattr(request, RAISED_ATTRIBUTE, exception)
            return None
        if isinstance(exception, QuotaExceeded):
            body = cast(dict[str, Any], exception.detail)  # QuotaExceeded's is a dict
            response = JsonResponse(dict(body), status=exception.status_code)
            for name, value in refusal_headers(exception).items():
                response[name] = value
            return response
        return None


def _with_refusal_headers(response: HttpResponseBase) -> HttpResponseBase:
    """Add a refusal's headers to the response DRF's exception handler built for it.

    The handler sets only ``Retry-After``; ``x-should-retry`` and the rate-limit headers
    come from the refusal, which its body (``RefusalBody``) still holds. Headers the view
    already set (``LLMQuotaThrottle`` sets them) are left as they are."""
    body = getattr(response, "data", None)
    if not isinstance(body, RefusalBody):
        return response
    for name, value in refusal_headers(body.refusal).items():
        if name not in response:
            response[name] = value
    return response
