"""The OpenAI-compatible endpoints; ``llm_quota.urls`` mounts them under ``v1/``.

``LLM_QUOTA["ASYNC_GATEWAY"]`` picks the gated views when the URLs are loaded: the
async ones (``gateway.async_views``) for ASGI servers, else the DRF views.
"""

from typing import Any

from django.urls import path, re_path

from llm_quota.conf import quota_settings
from llm_quota.gateway import views as gateway


def gated_view(name: str) -> Any:
    """The view of ``views`` called ``name``, or its ``Async`` twin with ASYNC_GATEWAY."""
    if quota_settings.ASYNC_GATEWAY:
        from llm_quota.gateway import async_views

        return getattr(async_views, f"Async{name}").as_view()
    return getattr(gateway, name).as_view()


def chat_completions_view() -> Any:
    return gated_view("ChatCompletionsView")


urlpatterns = [
    path("chat/completions", chat_completions_view(), name="llm_quota_chat"),
    path("responses", gated_view("ResponsesView"), name="llm_quota_responses"),
    path("embeddings", gated_view("EmbeddingsView"), name="llm_quota_embeddings"),
    path("messages", gated_view("MessagesView"), name="llm_quota_messages"),
    path("models", gateway.ModelsView.as_view(), name="llm_quota_models"),
    path("models/<path:model>", gateway.ModelView.as_view(), name="llm_quota_model"),
    re_path(r"^.*$", gateway.not_found),
]
