"""The OpenAI-compatible gateway: ``POST /v1/chat/completions``, ``/v1/responses``,
``/v1/embeddings``, and ``GET /v1/models``.

Any OpenAI SDK gets per-user quotas by pointing ``base_url`` here and passing an
access token from ``/api/token/`` (or an API key, ``llm_quota/drf/api_keys.py``) as
``api_key``. The path of a request reads top to bottom: ``ApiKeyAuthentication`` or
``JWTAuthentication`` → ``HasScope`` (``llm:chat``) → the body parsed once by its API's
shape (``ChatRequest``, ``ResponsesRequest``, ``EmbeddingsRequest``, ``MessagesRequest``)
→ admission (``QuotaGuard``, with the key and the team that pay) → ``GatedCall``: the
upstream call with the reserved cap, then settle. Every error, ours or the upstream's,
is answered in OpenAI's shape (``drf.errors``), or Anthropic's on ``/v1/messages``.

The view owns its reservation from admission to settle (``call``); no throttle
and no middleware touches it. ``async_views`` is the same endpoints as Django async
views, for ASGI servers (``LLM_QUOTA["ASYNC_GATEWAY"]``), sharing every step but the
waiting.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.http import HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.views import APIView

from llm_quota.conf import quota_settings
from llm_quota.drf.anthropic import anthropic_answer
from llm_quota.drf.api_keys import ApiKeyAuthentication, credential_of
from llm_quota.drf.authenticate import api_key_as_bearer
from llm_quota.drf.errors import error_response, exception_handler
from llm_quota.drf.jwt import CachedJWTAuthentication
from llm_quota.drf.parsers import JSONParser
from llm_quota.drf.permissions import HasScope
from llm_quota.gateway import schema as gateway_schema
from llm_quota.gateway.call import GatedCall
from llm_quota.quota.guard import QuotaGuard
from llm_quota.rules.policy import policy_for
from llm_quota.rules.pricing import priced_models
from llm_quota.shapes.base import ShapeRequest
from llm_quota.shapes.chat import ChatRequest
from llm_quota.shapes.embeddings import EmbeddingsRequest
from llm_quota.shapes.messages import MessagesRequest
from llm_quota.shapes.responses import ResponsesRequest


class IgnoreAccept(BaseContentNegotiation):
    """Answer JSON (or the SSE stream) whatever ``Accept`` says: OpenAI never sends 406."""

    def select_parser(self, request: Any, parsers: Iterable[BaseParser]) -> BaseParser:
        return next(iter(parsers))

    def select_renderer(
        self, request: Any, renderers: Iterable[BaseRenderer], format_suffix: Any = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class OpenAIView(APIView):
    """Base of the ``/v1/`` views: an API key or a JWT as bearer, the chat scope, OpenAI
    errors."""

    authentication_classes = [ApiKeyAuthentication, CachedJWTAuthentication]
    permission_classes = [HasScope]
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = IgnoreAccept

    @property
    def required_scopes(self) -> list[str]:
        return [quota_settings.CHAT_SCOPE]

    def get_exception_handler(self) -> Any:
        return exception_handler


class GatedView(OpenAIView):
    """A gated ``POST`` of one API: its ``shape`` reads the body; the rest is shared."""

    throttle_classes: list[Any] = []  # the view admits the call itself, below
    shape: Any = ChatRequest  # a ``ShapeRequest`` class: ``shape.from_body(data)``

    def post(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        call: ShapeRequest = self.shape.from_body(request.data)
        guard = QuotaGuard(
            request.user, api_key=credential_of(request.auth), team=organization(request),
            **call.quota_kwargs(),
        ).admit()  # fmt: skip
        return GatedCall(call, guard, request.user, self.shaped).answer()

    @staticmethod
    def shaped(response: HttpResponseBase) -> HttpResponseBase:
        """An answer in this API's shape (made in OpenAI's)."""
        return response


class ChatCompletionsView(GatedView):
    shape = ChatRequest

    @gateway_schema.chat_completions
    def post(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return super().post(request, *args, **kwargs)


class ResponsesView(GatedView):
    shape = ResponsesRequest

    @gateway_schema.responses
    def post(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return super().post(request, *args, **kwargs)


def anthropic_exception_handler(exc: Exception, context: dict[str, Any]) -> Any:
    """``exception_handler``, answered in Anthropic's shape."""
    return anthropic_answer(exception_handler(exc, context))


class MessagesView(GatedView):
    """The Anthropic Messages API: ``x-api-key`` or Bearer, Anthropic's error shape."""

    shape = MessagesRequest
    shaped = staticmethod(anthropic_answer)

    def initialize_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        api_key_as_bearer(request)
        return super().initialize_request(request, *args, **kwargs)

    def get_exception_handler(self) -> Any:
        return anthropic_exception_handler

    @gateway_schema.messages
    def post(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return super().post(request, *args, **kwargs)


class EmbeddingsView(GatedView):
    shape = EmbeddingsRequest

    @gateway_schema.embeddings
    def post(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return super().post(request, *args, **kwargs)


def organization(request: Any) -> str | None:
    """The team a request names to pay: ``OpenAI-Organization`` (the SDK's
    ``organization=``), a team's slug (contract section 10)."""
    return request.headers.get("OpenAI-Organization") or None


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "system"}


class ModelsView(OpenAIView):
    """The models the caller's tier allows (priced, exact names)."""

    @gateway_schema.list_models
    def get(self, request: Any, *args: Any, **kwargs: Any) -> JsonResponse:
        policy = policy_for(request.user)
        models = [_model(name) for name in priced_models() if policy.allows_model(name)]
        return JsonResponse({"object": "list", "data": models})


class ModelView(OpenAIView):
    @gateway_schema.retrieve_model
    def get(self, request: Any, model: str, *args: Any, **kwargs: Any) -> JsonResponse:
        if model not in priced_models() or not policy_for(request.user).allows_model(model):
            return error_response(
                404, f"The model '{model[:80]}' does not exist or you do not have access to it.",
                type="invalid_request_error", code="model_not_found", param="model",
            )  # fmt: skip
        return JsonResponse(_model(model))


@csrf_exempt
def not_found(request: Any, *args: Any, **kwargs: Any) -> JsonResponse:
    """Unknown ``/v1/`` paths answer 404 in OpenAI's shape, not Django's HTML page."""
    return error_response(
        404, f"Unknown endpoint {request.method} {request.path}.",
        type="invalid_request_error", code="unknown_url",
    )  # fmt: skip
