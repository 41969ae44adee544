"""The OpenAI-compatible endpoints; ``llm_quota.urls`` mounts them under ``v1/``."""

from django.urls import path, re_path

from llm_quota import gateway

urlpatterns = [
    path("chat/completions", gateway.ChatCompletionsView.as_view(), name="llm_quota_chat"),
    path("models", gateway.ModelsView.as_view(), name="llm_quota_models"),
    path("models/<path:model>", gateway.ModelView.as_view(), name="llm_quota_model"),
    re_path(r"^.*$", gateway.not_found),
]
