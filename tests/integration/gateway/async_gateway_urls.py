"""The demo project's URLs with the async gated views in front (as ``ASYNC_GATEWAY``
routes them), and async plain views gated by the middleware in its async mode."""

import asyncio

from django.http import JsonResponse, StreamingHttpResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from llm_quota.decorators import quota_gated
from llm_quota.gateway.async_views import (
    AsyncChatCompletionsView,
    AsyncEmbeddingsView,
    AsyncMessagesView,
    AsyncResponsesView,
)
from tests.integration.pipeline_urls import USAGE


@csrf_exempt
@quota_gated
async def aplain(request):
    return JsonResponse({"usage": USAGE, "max_tokens": request.llm_quota.max_tokens})


@csrf_exempt
@quota_gated
async def aplain_stream_unsettled(request):
    async def parts():
        for part in (b"a", b"b"):
            await asyncio.sleep(0)
            yield part

    return StreamingHttpResponse(parts())


urlpatterns = [
    path("v1/chat/completions", AsyncChatCompletionsView.as_view()),
    path("v1/responses", AsyncResponsesView.as_view()),
    path("v1/embeddings", AsyncEmbeddingsView.as_view()),
    path("v1/messages", AsyncMessagesView.as_view()),
    path("aplain", aplain),
    path("aplain/stream-unsettled", aplain_stream_unsettled),
    path("", include("project.urls")),
]
