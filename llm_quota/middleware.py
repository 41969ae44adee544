"""``LLMQuotaMiddleware``: the gate for plain Django views, and the end of every ticket.

Two jobs, both thin:

1. **Plain views** marked with ``@quota_gated``: before the view runs, authenticate
   (the session user, else DRF's configured authenticators, so JWT and DRF tokens
   work on plain views too), check the chat scope, price the request
   (``get_quota_request``, by default the OpenAI JSON body) and reserve through
   ``QuotaGuard``. A refusal is answered here, in OpenAI's error shape, and the view
   never runs. Unauthenticated and out-of-scope callers are refused before any
   Redis command. The admitted guard is ``request.llm_quota``.
2. **Every response** whose request holds an unfinished guard (from here or from
   ``LLMQuotaThrottle``): settle it from the response's OpenAI ``usage``, release it
   on an error status (the view failed, or a later check refused), otherwise charge
   the estimate. A streamed response is finished when its stream ends or the client
   goes away; a view that streams should settle inside its generator.

Add it to ``MIDDLEWARE`` (any position: ``process_view`` runs after every
middleware's request phase, so ``request.user`` is set).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import APIException, AuthenticationFailed, NotAuthenticated
from rest_framework.request import Request
from rest_framework.settings import api_settings

from llm_quota.chat_request import ChatRequest
from llm_quota.conf import quota_settings
from llm_quota.exceptions import InsufficientScope, InvalidRequest
from llm_quota.guard import QuotaGuard
from llm_quota.openai_errors import response_for_exception
from llm_quota.permissions import granted_scopes
from llm_quota.ratelimit_headers import headers_for
from llm_quota.throttling import REQUEST_ATTRIBUTE

GATED_ATTRIBUTE = "llm_quota_gated"
#: Bodies larger than this are not parsed for a ``usage`` (an LLM answer is far smaller).
MAX_USAGE_BODY = 2 * 1024 * 1024


def quota_gated(view: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a plain view (function, or ``View.as_view()``) as an LLM call to gate."""
    setattr(view, GATED_ATTRIBUTE, True)
    return view


def usage_of(response: HttpResponseBase) -> Any:
    """The OpenAI ``usage`` of a JSON response (DRF ``Response`` or plain), or None."""
    data = getattr(response, "data", None)
    if data is None and "json" in response.get("Content-Type", ""):
        content = getattr(response, "content", b"")
        if len(content) <= MAX_USAGE_BODY:
            try:
                data = json.loads(content)
            except ValueError:
                return None
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else None


class FinishedWithStream:
    """A streamed body that ends ``guard`` when Django closes the response.

    Django calls ``close()`` once the body is sent, or the client has gone, or even
    when the body was never read; a view that streams should settle inside its
    generator, and whatever it left unsettled is charged at the estimate here.
    """

    def __init__(self, content: Iterable[bytes], guard: QuotaGuard) -> None:
        self.content = content
        self.guard = guard

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.content)

    def close(self) -> None:
        if not self.guard.finished:
            self.guard.charge_estimate()


def finish(guard: QuotaGuard, response: HttpResponseBase) -> None:
    """End ``guard`` according to ``response`` (see the module docstring)."""
    if guard.finished:
        return
    if response.status_code >= 400:
        guard.release()
    elif response.streaming:
        response.streaming_content = FinishedWithStream(response.streaming_content, guard)
    else:
        usage = usage_of(response)
        if usage is not None:
            guard.settle(usage)
        else:
            guard.charge_estimate()


class LLMQuotaMiddleware(MiddlewareMixin):
    def get_quota_request(self, request: HttpRequest, view_func: Any) -> dict[str, Any]:
        """Keyword arguments for ``quota_guard``; default: the OpenAI Chat Completions body."""
        try:
            body = json.loads(request.body or b"null")
        except ValueError as exc:
            raise InvalidRequest("The request body is not valid JSON.") from exc
        return ChatRequest.from_body(body).quota_kwargs()

    def get_authenticators(self) -> list[Any]:
        # The session user is already on request.user; SessionAuthentication would
        # only add a second CSRF check.
        return [
            cls()
            for cls in api_settings.DEFAULT_AUTHENTICATION_CLASSES
            if not issubclass(cls, SessionAuthentication)
        ]

    def authenticate(self, request: HttpRequest) -> tuple[Any, Any]:
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            return user, None
        wrapped = Request(request)
        header = None
        for authenticator in self.get_authenticators():
            header = header or authenticator.authenticate_header(wrapped)
            try:
                result = authenticator.authenticate(wrapped)
            except AuthenticationFailed as exc:
                exc.auth_header = authenticator.authenticate_header(wrapped)
                raise
            if result is not None:
                return result
        exc = NotAuthenticated()
        exc.auth_header = header
        raise exc

    def admit(self, request: HttpRequest, view_func: Any) -> QuotaGuard:
        user, auth = self.authenticate(request)
        scope = quota_settings.CHAT_SCOPE
        if scope not in granted_scopes(SimpleNamespace(user=user, auth=auth)):
            raise InsufficientScope(f"This endpoint requires the scope {scope}.")
        return QuotaGuard(user, **self.get_quota_request(request, view_func)).admit()

    def process_view(
        self, request: HttpRequest, view_func: Any, view_args: Any, view_kwargs: Any
    ) -> HttpResponseBase | None:
        if not getattr(view_func, GATED_ATTRIBUTE, False):
            return None
        try:
            guard = self.admit(request, view_func)
        except (APIException, RequestDataTooBig) as exc:
            return response_for_exception(exc)
        setattr(request, REQUEST_ATTRIBUTE, guard)
        return None

    def process_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        guard = getattr(request, REQUEST_ATTRIBUTE, None)
        if not isinstance(guard, QuotaGuard):
            return response
        # Plain views have no DRF ``view.headers``; the throttle's are already there.
        for name, value in headers_for(guard.decision, max_tokens=guard.max_tokens).items():
            if name not in response:
                response[name] = value
        finish(guard, response)
        return response
