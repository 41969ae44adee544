"""``@quota_gated``: a plain Django view (sync or async) as a gated LLM call.

```python
@quota_gated
def summarise(request):
    quota = request.llm_quota            # the admitted QuotaGuard
    ...                                  # call the LLM with quota.max_tokens
    quota.settle(usage)                  # or return a JSON body with "usage" in it
```

Before the view runs: authenticate (the session user, else DRF's
``DEFAULT_AUTHENTICATION_CLASSES``, so JWT and DRF tokens work on plain views too),
enforce CSRF for the session user only, as DRF's ``SessionAuthentication`` does (a
browser sends the cookie cross-site by itself, never a bearer token; so the gated view
is ``csrf_exempt`` and needs no decorator for it), check ``CHAT_SCOPE``, price the
body through the chat shape (``quota_request``) and admit. Unauthenticated and
out-of-scope callers, and session callers without a valid CSRF token, are refused
before any Redis command; every refusal is answered in OpenAI's error shape and the
view never runs.

The decorator owns the reservation until it ends: what the view left unsettled is
finished by the release rule (``quota.release_rule``; ``ending`` applies it to a
response): settled from the ``usage`` of a JSON body (whatever the status); released
where the view raised what shows nothing was billed (the provider's error answer, a
connection never made, a refusal) or answered an error status of 4xx, 502 or 503;
otherwise charged the estimate (a bug, a timeout, 500, 504, a plain answer), since a
call that ran is never lost. A streamed response is finished when Django closes it;
a view that streams should settle inside its generator.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NamedTuple, cast

from asgiref.sync import iscoroutinefunction
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.settings import api_settings

from llm_quota.conf import quota_settings
from llm_quota.drf import authenticate as authentication
from llm_quota.drf.api_keys import ApiKeyAuthentication, credential_of
from llm_quota.drf.errors import response_for_exception
from llm_quota.drf.permissions import scopes_plan
from llm_quota.drf.throttling import REQUEST_ATTRIBUTE, admission_headers
from llm_quota.exceptions import InsufficientScope, InvalidRequest
from llm_quota.ledger.plans import Plan
from llm_quota.quota.drivers import Blocking, arun, run
from llm_quota.quota.guard import QuotaGuard
from llm_quota.quota.release_rule import unbilled_status
from llm_quota.shapes.chat import ChatRequest

#: Bodies larger than this are not parsed for a ``usage`` (an LLM answer is far smaller).
MAX_USAGE_BODY = 2 * 1024 * 1024
#: What admission raises for a caller it refuses; anything else is a bug, left to Django.
REFUSALS = (APIException, RequestDataTooBig)


def chat_quota_request(request: HttpRequest) -> dict[str, Any]:
    """What to price, as ``QuotaGuard`` keyword arguments: an OpenAI Chat Completions body."""
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("The request body is not valid JSON.") from exc
    return ChatRequest.from_body(body).quota_kwargs()


def _authenticators() -> list[Any]:
    # The session user is already on request.user (``_session_user``, which checks CSRF).
    # An API key works wherever a JWT does (contract section 9): tried first, it passes
    # any other bearer on. api_settings imports the dotted paths; the stubs type the
    # setting as strings.
    configured: list[type] = api_settings.DEFAULT_AUTHENTICATION_CLASSES  # type: ignore[assignment]
    classes = [ApiKeyAuthentication, *configured]
    return [cls() for cls in dict.fromkeys(classes) if not issubclass(cls, SessionAuthentication)]


def _require_chat_scope(granted: set[str]) -> None:
    scope = quota_settings.CHAT_SCOPE
    if scope not in granted:
        raise InsufficientScope(f"This endpoint requires the scope {scope}.")


def admission_plan(
    request: HttpRequest, quota_request: Callable[[HttpRequest], dict]
) -> Plan[QuotaGuard]:
    """Authenticate, check the chat scope, price and reserve, or raise the refusal.

    The session user first (read in a thread on an event loop: it may hit the
    database), its CSRF token checked, else DRF's authenticators, which may read the
    database too."""
    user = yield Blocking(_session_user, (request,))
    auth = None
    if user is None:
        drf_request = Request(request, authenticators=_authenticators())
        user, auth = yield Blocking(authentication.authenticate, (drf_request,))
    _require_chat_scope((yield from scopes_plan(user, auth)))
    team = request.headers.get("OpenAI-Organization") or None  # a team's slug
    guard = QuotaGuard(user, api_key=credential_of(auth), team=team, **quota_request(request))
    return (yield from guard.admit_plan())


def _session_user(request: HttpRequest) -> Any:
    """The user of the session cookie, or None; refused (403) without a valid CSRF token.

    DRF's own check (``CsrfViewMiddleware``'s), as for any DRF view with session
    authentication: it passes at once where the middleware already checked this request.
    """
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    # DRF's check reads only what a Django request has; the stubs ask for a DRF Request.
    SessionAuthentication().enforce_csrf(request)  # type: ignore[arg-type]
    return user


def admit(request: HttpRequest, quota_request: Callable[[HttpRequest], dict]) -> QuotaGuard:
    return run(admission_plan(request, quota_request))


async def aadmit(request: HttpRequest, quota_request: Callable[[HttpRequest], dict]) -> QuotaGuard:
    return await arun(admission_plan(request, quota_request))


# -- finishing what the view left unsettled ---------------------------------------------


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
    when the body was never read; whatever the view left unsettled is charged at the
    estimate here. Under ASGI Django calls ``close()`` in a thread, so the sync ledger
    is right there too.
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


class Ending(NamedTuple):
    """The guard method that ends a reservation, named once for both drivers: ``run``
    calls it, ``arun`` its async twin (``a`` + the name, the guard's convention)."""

    method: str
    args: tuple[Any, ...] = ()

    def run(self, guard: QuotaGuard) -> None:
        getattr(guard, self.method)(*self.args)

    async def arun(self, guard: QuotaGuard) -> None:
        await getattr(guard, "a" + self.method)(*self.args)


def ending(
    guard: QuotaGuard, response: HttpResponseBase, raised: BaseException | None = None
) -> Ending | None:
    """How ``response`` ends ``guard``, or None when nothing is left to do now: the
    release rule (``quota.release_rule``) applied to a response.

    ``raised``, the exception the view raised (the middleware sees it in
    ``process_exception``), is judged by ``QuotaGuard.fail``. Otherwise a JSON
    ``usage`` settles it, whatever the status; an error status releases it where the
    view answered instead of an LLM (4xx, 502, 503) and charges the estimate where
    the call may have run (500, 504, other 5xx); a stream is finished when Django
    closes it; any other answer is charged the estimate. The admission's rate-limit
    headers are added where the view did not set its own.
    """
    for name, value in admission_headers(guard).items():
        if name not in response:
            response[name] = value
    if guard.finished:
        return None
    if raised is not None:
        return Ending("fail", (raised,))
    usage = None if response.streaming else usage_of(response)
    if usage is not None:
        return Ending("settle", (usage,))
    if response.status_code >= 400:
        return Ending("release" if unbilled_status(response.status_code) else "charge_estimate")
    if response.streaming:
        stream = cast(StreamingHttpResponse, response)  # what ``streaming`` promises
        wrapper = FinishedWithAsyncStream if stream.is_async else FinishedWithStream
        stream.streaming_content = wrapper(stream.streaming_content, guard)
        return None
    return Ending("charge_estimate")


def finish(
    guard: QuotaGuard, response: HttpResponseBase, raised: BaseException | None = None
) -> HttpResponseBase:
    """End what ``response`` leaves of ``guard`` (see ``ending``)."""
    step = ending(guard, response, raised)
    if step is not None:
        step.run(guard)
    return response


async def afinish(
    guard: QuotaGuard, response: HttpResponseBase, raised: BaseException | None = None
) -> HttpResponseBase:
    step = ending(guard, response, raised)
    if step is not None:
        await step.arun(guard)
    return response


# -- the decorator ------------------------------------------------------------------------


def _refusal(exc: BaseException) -> HttpResponseBase:
    """The response for one of ``REFUSALS`` (never None for them)."""
    response = response_for_exception(exc)
    if response is None:  # pragma: no cover - not a refusal: a bug, left to Django
        raise exc
    return response


def _gate_sync(view: Callable[..., Any], quota_request: Callable[..., dict]) -> Any:
    @functools.wraps(view)
    def gated(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            guard = admit(request, quota_request)
        except REFUSALS as exc:
            return _refusal(exc)
        setattr(request, REQUEST_ATTRIBUTE, guard)
        try:
            response = view(request, *args, **kwargs)
        except BaseException as exc:
            guard.fail(exc)  # released only if it proves nothing was billed
            raise
        return finish(guard, response)

    return csrf_exempt(gated)  # CSRF is checked for session callers only (_session_user)


def _gate_async(view: Callable[..., Any], quota_request: Callable[..., dict]) -> Any:
    @functools.wraps(view)
    async def agated(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            guard = await aadmit(request, quota_request)
        except REFUSALS as exc:
            return _refusal(exc)
        setattr(request, REQUEST_ATTRIBUTE, guard)
        try:
            return await afinish(guard, await view(request, *args, **kwargs))
        except BaseException as exc:
            # Released only if it proves nothing was billed; a client leaving
            # (CancelledError) mid-call is charged the estimate. Shielded, so that
            # leaving cannot cut it short; nothing if the answer already ended it.
            await asyncio.shield(guard.afail(exc))
            raise

    return csrf_exempt(agated)  # CSRF is checked for session callers only (_session_user)


def quota_gated(
    view: Callable[..., Any] | None = None,
    *,
    quota_request: Callable[[HttpRequest], dict[str, Any]] = chat_quota_request,
) -> Any:
    """Gate a plain view (function, or ``View.as_view()``; sync or async) as an LLM call.

    ``@quota_gated`` prices an OpenAI Chat Completions body;
    ``@quota_gated(quota_request=f)`` prices whatever ``f(request)`` returns
    (``QuotaGuard`` keyword arguments: ``model``, ``messages``, ``max_tokens``...).
    """
    if view is None:
        return functools.partial(quota_gated, quota_request=quota_request)
    if iscoroutinefunction(view):
        return _gate_async(view, quota_request)
    return _gate_sync(view, quota_request)
