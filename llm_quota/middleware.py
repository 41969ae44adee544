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

It is sync and async capable: under ASGI it runs as a coroutine (the guard's async
methods, the session user through ``request.auser()``), so Django does not hop to a
thread for it on every request. A subclass that overrides ``admit`` or
``authenticate`` has its own code run in a thread there.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.settings import api_settings

from llm_quota.conf import quota_settings
from llm_quota.drf import authenticate as authentication
from llm_quota.drf.errors import response_for_exception
from llm_quota.drf.permissions import agranted_scopes, granted_scopes
from llm_quota.drf.throttling import REQUEST_ATTRIBUTE, admission_headers
from llm_quota.exceptions import InsufficientScope, InvalidRequest
from llm_quota.quota.guard import QuotaGuard
from llm_quota.shapes.chat import ChatRequest

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
    generator, and whatever it left unsettled is charged at the estimate here. Under
    ASGI Django calls ``close()`` in a thread, so the sync ledger is right there too.
    """

    def __init__(self, content: Any, guard: QuotaGuard) -> None:
        self.content = content
        self.guard = guard

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.content)

    def close(self) -> None:
        if not self.guard.finished:
            self.guard.charge_estimate()


class FinishedWithAsyncStream(FinishedWithStream):
    """The same around an async body (an async view's): Django reads it with ``async for``."""

    __iter__ = None  # type: ignore[assignment]  # not iterable: Django takes __aiter__

    def __aiter__(self) -> AsyncIterator[bytes]:
        return aiter(self.content)


def _finish_with_stream(guard: QuotaGuard, response: HttpResponseBase) -> None:
    wrapper = FinishedWithAsyncStream if response.is_async else FinishedWithStream
    response.streaming_content = wrapper(response.streaming_content, guard)


def finish(guard: QuotaGuard, response: HttpResponseBase) -> None:
    """End ``guard`` according to ``response`` (see the module docstring)."""
    if guard.finished:
        return
    if response.status_code >= 400:
        guard.release()
    elif response.streaming:
        _finish_with_stream(guard, response)
    else:
        usage = usage_of(response)
        if usage is not None:
            guard.settle(usage)
        else:
            guard.charge_estimate()


async def afinish(guard: QuotaGuard, response: HttpResponseBase) -> None:
    """``finish`` for the async middleware: the guard's async methods."""
    if guard.finished:
        return
    if response.status_code >= 400:
        await guard.arelease()
    elif response.streaming:
        _finish_with_stream(guard, response)
    else:
        usage = usage_of(response)
        if usage is not None:
            await guard.asettle(usage)
        else:
            await guard.acharge_estimate()


def _add_headers(guard: QuotaGuard, response: HttpResponseBase) -> None:
    # Plain views have no DRF ``view.headers``; the throttle's are already there.
    for name, value in admission_headers(guard).items():
        if name not in response:
            response[name] = value


class LLMQuotaMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[..., Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
            # Django adapts ``process_view`` to the handler by its kind: a coroutine
            # here runs on the loop, with no thread hop per request.
            self.process_view = self.aprocess_view  # type: ignore[method-assign]

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        return self.process_response(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        return await self.aprocess_response(request, response)

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
        return authentication.authenticate(
            Request(request, authenticators=self.get_authenticators())
        )

    async def aauthenticate(self, request: HttpRequest) -> tuple[Any, Any]:
        if type(self).authenticate is not LLMQuotaMiddleware.authenticate:
            return await sync_to_async(self.authenticate)(request)  # a subclass' own
        # An async request's ``request.user`` would read the session on the loop.
        auser = getattr(request, "auser", None)
        user = await auser() if auser is not None else None
        if user is not None and user.is_authenticated:
            return user, None
        return await authentication.aauthenticate(
            Request(request, authenticators=self.get_authenticators())
        )

    @staticmethod
    def check_scope(granted: set[str]) -> None:
        scope = quota_settings.CHAT_SCOPE
        if scope not in granted:
            raise InsufficientScope(f"This endpoint requires the scope {scope}.")

    def admit(self, request: HttpRequest, view_func: Any) -> QuotaGuard:
        user, auth = self.authenticate(request)
        self.check_scope(granted_scopes(SimpleNamespace(user=user, auth=auth)))
        return QuotaGuard(user, **self.get_quota_request(request, view_func)).admit()

    async def aadmit(self, request: HttpRequest, view_func: Any) -> QuotaGuard:
        if type(self).admit is not LLMQuotaMiddleware.admit:
            # A subclass' own admission runs as written, in a thread; the guard it
            # returns is finished with its async methods all the same.
            return await sync_to_async(self.admit)(request, view_func)
        user, auth = await self.aauthenticate(request)
        self.check_scope(await agranted_scopes(user, auth))
        return await QuotaGuard(user, **self.get_quota_request(request, view_func)).aadmit()

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

    async def aprocess_view(
        self, request: HttpRequest, view_func: Any, view_args: Any, view_kwargs: Any
    ) -> HttpResponseBase | None:
        if not getattr(view_func, GATED_ATTRIBUTE, False):
            return None
        try:
            guard = await self.aadmit(request, view_func)
        except (APIException, RequestDataTooBig) as exc:
            return response_for_exception(exc)
        setattr(request, REQUEST_ATTRIBUTE, guard)
        return None

    def process_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        guard = getattr(request, REQUEST_ATTRIBUTE, None)
        if isinstance(guard, QuotaGuard):
            _add_headers(guard, response)
            finish(guard, response)
        return response

    async def aprocess_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        guard = getattr(request, REQUEST_ATTRIBUTE, None)
        if isinstance(guard, QuotaGuard):
            _add_headers(guard, response)
            await afinish(guard, response)
        return response
