"""The async gateway: the gated ``POST``s of ``/v1/`` as Django async views, for ASGI.

The same request path as ``views.GatedView`` (JWT, the chat scope, the body parsed
once by its API's shape, admission, then ``GatedCall``: the upstream call, settle) and the
same answers: statuses, OpenAI-shaped errors, rate-limit headers, ``Retry-After``,
``x-should-retry``. What differs is that no thread waits: admission and settle go
through the guard's async methods (``AsyncLedger``), the upstream through its async
calls (aiohttp, ``async_http``; httpx's ``AsyncClient`` without it), and a stream
through ``AsyncRelay``. A warm request makes no hop to a thread at all: the token's
user, the tier and the price come from the config cache; only a miss reads the
database, in a thread.

DRF's ``APIView`` is sync-only, so this is a plain Django ``View`` built from DRF's
pieces rather than a copy of them: its ``Request`` parses the body and authenticates
exactly as the sync view's does, ``HasScope``'s check is ``require_scopes``, and
every error goes through ``drf.errors.response_for_exception``.

``LLM_QUOTA["ASYNC_GATEWAY"] = True`` routes ``/v1/chat/completions``,
``/v1/responses`` and ``/v1/embeddings`` here; serve the
project with an ASGI server (uvicorn), or every request runs its own event loop. Call
``warm_up()`` in the ASGI module, after ``get_asgi_application()``, so that a worker's
first requests find the URLs imported and the tokenizers loaded.
"""

from __future__ import annotations

import gc
from typing import Any

from django.http import HttpRequest, HttpResponseBase
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import MethodNotAllowed
from rest_framework.request import Request

from llm_quota.conf import quota_settings
from llm_quota.drf.anthropic import anthropic_answer
from llm_quota.drf.api_keys import credential_of
from llm_quota.drf.authenticate import api_key_as_bearer, authenticate_plan
from llm_quota.drf.errors import response_for_exception
from llm_quota.drf.permissions import require_scopes, scopes_plan
from llm_quota.gateway.call import GatedCall
from llm_quota.gateway.views import OpenAIView, organization
from llm_quota.ledger.plans import Plan
from llm_quota.quota.drivers import arun, track_sync_work
from llm_quota.quota.guard import QuotaGuard
from llm_quota.rules import estimation
from llm_quota.shapes.base import ShapeRequest
from llm_quota.shapes.chat import ChatRequest
from llm_quota.shapes.embeddings import EmbeddingsRequest
from llm_quota.shapes.messages import MessagesRequest
from llm_quota.shapes.responses import ResponsesRequest

#: The encodings OpenAI's current models use (``estimation.FALLBACK_ENCODING`` stands
#: in for unknown models).
WARM_ENCODINGS = ("o200k_base", estimation.FALLBACK_ENCODING)


def warm_up(encodings: tuple[str, ...] = WARM_ENCODINGS, *, freeze: bool = True) -> None:
    """Do a worker's one-time work before it serves, not on its event loop.

    Loading a tiktoken encoding takes a tenth of a second or more, in native code
    that holds the GIL for tens of milliseconds at a stretch: even in a thread (where
    admission counts a long prompt) that stalls the loop and every stream on it. The
    URL modules are imported on the first request otherwise, on the loop itself.

    Then, unless ``freeze`` is false, ``gc.freeze()``: what was loaded so far lives as
    long as the worker, yet every full collection walks all of it, a pause on the loop
    that grows with the machine's load (the long-stream benchmark). Frozen, a full
    collection walks only what requests created.
    """
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imports every URL module now
    for name in encodings:
        estimation.load_encoding(name)
    # A warm request authenticates on the loop (``authenticate_plan``): simplejwt loads
    # its token classes and PyJWT its algorithms on first use, so do that here.
    from rest_framework_simplejwt.settings import api_settings as jwt_settings
    from rest_framework_simplejwt.state import token_backend

    for authentication in OpenAIView.authentication_classes:
        authentication()
    jwt_settings.AUTH_TOKEN_CLASSES  # noqa: B018 - imports the token classes now
    try:
        token_backend.decode("warm.up.token")  # type: ignore[arg-type]  # the stub says Token; simplejwt passes the raw str
    except Exception:  # noqa: BLE001 - an invalid token is the point: only the import path runs
        pass
    try:  # the upstream's async client (aiohttp): its import would stall the first call
        from llm_quota.gateway import async_http  # noqa: F401
    except ImportError:  # no aiohttp: httpx serves the async calls (``HttpUpstream``)
        pass
    if freeze:
        gc.collect()  # what start-up left as garbage goes now, not frozen for good
        gc.freeze()


class AsyncGatedView(View):
    """``views.GatedView`` as an async view (see the module docstring)."""

    shape: Any = ChatRequest  # a ``ShapeRequest`` class: ``shape.from_body(data)``
    http_method_names = ["post", "options"]
    authentication_classes = OpenAIView.authentication_classes
    parser_classes = OpenAIView.parser_classes
    content_negotiation_class = OpenAIView.content_negotiation_class

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        return csrf_exempt(super().as_view(**initkwargs))  # a bearer token, no cookie

    @property
    def required_scopes(self) -> list[str]:
        return [quota_settings.CHAT_SCOPE]

    def initialize_request(self, request: HttpRequest) -> Request:
        """DRF's request, as an ``APIView`` would build it: same parser, same auth."""
        return Request(
            request,
            parsers=[parser() for parser in self.parser_classes],
            authenticators=[auth() for auth in self.authentication_classes],
            negotiator=self.content_negotiation_class(),
        )

    async def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        response = await self.answer(request)
        response["Allow"] = self.allow_header()  # DRF sends it on every response too
        return response

    def admission_plan(self, request: HttpRequest) -> Plan[tuple[ShapeRequest, QuotaGuard, Any]]:
        """Authenticate (the token's user from memory, else in a thread), check the
        scope, parse the body once and admit: the sync view's steps, as one plan."""
        drf_request = self.initialize_request(request)
        user, auth = yield from authenticate_plan(drf_request)
        require_scopes(self.required_scopes, (yield from scopes_plan(user, auth)))
        call: ShapeRequest = self.shape.from_body(drf_request.data)
        guard = QuotaGuard(
            user, api_key=credential_of(auth), team=organization(request), **call.quota_kwargs()
        )
        yield from guard.admit_plan()
        return call, guard, user

    async def answer(self, request: HttpRequest) -> HttpResponseBase:
        track_sync_work()  # so that a warm request skips ``ahand_back``'s thread hop
        try:
            call, guard, user = await arun(self.admission_plan(request))
        except Exception as exc:
            response = response_for_exception(exc)
            if response is None:
                raise
            return self.shaped(response)
        return await GatedCall(call, guard, user, self.shaped).aanswer()

    @staticmethod
    def shaped(response: HttpResponseBase) -> HttpResponseBase:
        """An answer in this API's shape (made in OpenAI's)."""
        return response

    def allow_header(self) -> str:
        # Django's View._allowed_methods (private, so not in the stubs), as APIView uses it.
        return ", ".join(self._allowed_methods())  # type: ignore[attr-defined]

    def http_method_not_allowed(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        refused = response_for_exception(MethodNotAllowed(request.method or ""))
        assert refused is not None
        response = self.shaped(refused)
        response["Allow"] = self.allow_header()

        async def answer() -> HttpResponseBase:
            return response

        return answer()


class AsyncChatCompletionsView(AsyncGatedView):
    shape = ChatRequest


class AsyncResponsesView(AsyncGatedView):
    shape = ResponsesRequest


class AsyncEmbeddingsView(AsyncGatedView):
    shape = EmbeddingsRequest


class AsyncMessagesView(AsyncGatedView):
    """``views.MessagesView`` as an async view: ``x-api-key`` or Bearer, Anthropic's shape."""

    shape = MessagesRequest
    shaped = staticmethod(anthropic_answer)

    def initialize_request(self, request: HttpRequest) -> Request:
        api_key_as_bearer(request)
        return super().initialize_request(request)
