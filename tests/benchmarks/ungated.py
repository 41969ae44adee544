"""The gateway's work minus the gate, for section 4's baseline (bench-only, never mounted
by the project).

Served by the same gunicorn as the real gateway (``e2e_settings`` mounts it next to
``/v1/``): JWT authentication (a deployment without quotas still authenticates), the
same body validation (``ChatRequest``) and the same upstream call, but no scope check,
no throttle, no estimate, no reservation and no settle.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponseBase, JsonResponse
from django.urls import path
from rest_framework.permissions import IsAuthenticated

from llm_quota.gateway.upstream import get_upstream
from llm_quota.gateway.views import OpenAIView
from llm_quota.shapes.chat import ChatRequest
from project.urls import urlpatterns as project_urlpatterns

#: The cap sent when the caller set none (the gated path sends the reserved one).
DEFAULT_CAP = 64


class UngatedChatCompletionsView(OpenAIView):
    permission_classes = [IsAuthenticated]
    throttle_classes: list[Any] = []

    def post(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponseBase:
        chat = ChatRequest.from_body(request.data)
        body = chat.upstream_body(chat.max_tokens or DEFAULT_CAP)
        return JsonResponse(get_upstream().complete(body))


urlpatterns = [
    *project_urlpatterns,
    path("bench/ungated/chat/completions", UngatedChatCompletionsView.as_view()),
]
