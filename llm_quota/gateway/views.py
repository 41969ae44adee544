"""The OpenAI-compatible gateway: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Any OpenAI SDK gets per-user quotas by pointing ``base_url`` here and passing an
access token from ``/api/token/`` as ``api_key``. The path of a request:
``JWTAuthentication`` → ``HasScope`` (``llm:chat``) → ``LLMQuotaThrottle`` (reserve)
→ this view (the upstream call with the reserved ``max_tokens``) → settle. Every
error, ours or the upstream's, is answered in OpenAI's shape (``openai_errors``).

The view owns its reservation from the throttle on: it settles from the upstream's
usage (or the counted output), releases on any upstream failure, and a streamed
answer is settled by ``stream_relay`` whenever and however the stream ends.

``async_gateway`` is the same endpoint as a Django async view, for ASGI servers
(``LLM_QUOTA["ASYNC_GATEWAY"]``); the pieces both use live here.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView
from rest_framework_simplejwt.authentication import JWTAuthentication

from llm_quota.conf import quota_settings
from llm_quota.drf.errors import error_response, exception_handler
from llm_quota.drf.permissions import HasScope
from llm_quota.drf.throttling import REQUEST_ATTRIBUTE, LLMQuotaThrottle
from llm_quota.gateway import relay as stream_relay
from llm_quota.gateway import schema as gateway_schema
from llm_quota.gateway.upstream import UpstreamError, get_upstream
from llm_quota.quota.guard import QuotaGuard
from llm_quota.rules.policy import policy_for
from llm_quota.rules.pricing import priced_models
from llm_quota.shapes.chat import ChatRequest
from llm_quota.shapes.output_text import completion_text, reported_usage

logger = logging.getLogger("llm_quota")


class IgnoreAccept(BaseContentNegotiation):
    """Answer JSON (or the SSE stream) whatever ``Accept`` says: OpenAI never sends 406."""

    def select_parser(self, request: Any, parsers: list[Any]) -> Any:
        return parsers[0]

    def select_renderer(self, request: Any, renderers: list[Any], format_suffix: Any = None):
        return renderers[0], renderers[0].media_type


def upstream_error_response(exc: UpstreamError) -> JsonResponse:
    """The upstream's status and its own OpenAI-shaped error where it sent one."""
    error = dict(exc.error or {})
    error["message"] = str(error.get("message") or exc.message)
    error["type"] = str(
        error.get("type") or ("server_error" if exc.status >= 500 else "upstream_error")
    )
    error["code"] = error.get("code") or exc.code
    error.setdefault("param", None)
    response = JsonResponse({"error": error}, status=exc.status)
    for name, value in exc.headers.items():
        response[name] = value
    return response


def upstream_failed(chat: ChatRequest, user: Any, exc: UpstreamError) -> JsonResponse:
    """The answer to a call the upstream refused (its reservation already released)."""
    logger.warning("upstream refused %s for user %s: %s", chat.model, user.pk, exc)
    return upstream_error_response(exc)


def stream_response(content: Any) -> StreamingHttpResponse:
    """A server-sent events response relaying ``content`` (a ``Relay`` or ``AsyncRelay``)."""
    response = StreamingHttpResponse(content, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def settle_completion(guard: QuotaGuard, completion: dict[str, Any]) -> None:
    """Settle a non-streamed answer: from its usage, else from the text it holds."""
    usage = reported_usage(completion.get("usage"))
    if usage is not None:
        guard.settle(usage)
    else:
        guard.settle_output(completion_text(completion))


async def asettle_completion(guard: QuotaGuard, completion: dict[str, Any]) -> None:
    """``settle_completion`` for the async gateway."""
    usage = reported_usage(completion.get("usage"))
    if usage is not None:
        await guard.asettle(usage)
    else:
        await guard.asettle_output(completion_text(completion))


class OpenAIView(APIView):
    """Base of the ``/v1/`` views: JWT bearer auth, the chat scope, OpenAI errors."""

    authentication_classes = [JWTAuthentication]
    permission_classes = [HasScope]
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = IgnoreAccept

    @property
    def required_scopes(self) -> list[str]:
        return [quota_settings.CHAT_SCOPE]

    def get_exception_handler(self) -> Any:
        return exception_handler


class ChatCompletionsView(OpenAIView):
    throttle_classes = [LLMQuotaThrottle]

    @gateway_schema.chat_completions
    def post(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        chat = ChatRequest.from_body(request.data)
        guard: QuotaGuard = getattr(request, REQUEST_ATTRIBUTE)
        body = chat.upstream_body(guard.max_tokens)
        upstream = get_upstream()
        try:
            if chat.stream:
                stream = upstream.stream(body)
            else:
                completion = upstream.complete(body)
        except UpstreamError as exc:
            guard.release()
            return upstream_failed(chat, request.user, exc)
        if chat.stream:
            return stream_response(
                stream_relay.Relay(stream, guard, include_usage=chat.include_usage)
            )
        settle_completion(guard, completion)
        return JsonResponse(completion)

    def handle_exception(self, exc: Exception) -> HttpResponseBase:
        # Whatever failed after admission (a bug, another throttle's refusal), the
        # reservation must not wait for its lease to expire.
        guard = getattr(self.request, REQUEST_ATTRIBUTE, None)
        if isinstance(guard, QuotaGuard) and not guard.finished:
            guard.release()
        return super().handle_exception(exc)


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
