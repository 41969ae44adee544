"""The OpenAI-compatible endpoints; ``llm_quota.urls`` mounts them under ``v1/``.

``LLM_QUOTA["ASYNC_GATEWAY"]`` picks the chat view when the URLs are loaded: the
async one (``gateway.async_views``) for ASGI servers, else the DRF view.
"""

from typing import Any

from django.urls import path, re_path

from llm_quota.conf import quota_settings
from llm_quota.gateway import views as gateway


def chat_completions_view() -> Any:
    if quota_settings.ASYNC_GATEWAY:
        from llm_quota.gateway.async_views import AsyncChatCompletionsView

        return AsyncChatCompletionsView.as_view()
    return gateway.ChatCompletionsView.as_view()


urlpatterns = [
    path("chat/completions", chat_completions_view(), name="llm_quota_chat"),
    path("models", gateway.ModelsView.as_view(), name="llm_quota_models"),
    path("models/<path:model>", gateway.ModelView.as_view(), name="llm_quota_model"),
    re_path(r"^.*$", gateway.not_found),
]
