"""The app's URLs: the JWT token views, the OpenAI-compatible gateway under ``v1/`` and
the usage API under ``api/llm-quota/``. The demo project mounts them at the root."""

from django.urls import include, path

from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairView, ScopedTokenRefreshView

urlpatterns = [
    path("api/token/", ScopedTokenObtainPairView.as_view(), name="token_obtain_pair"),
    path("api/token/refresh/", ScopedTokenRefreshView.as_view(), name="token_refresh"),
    path("v1/", include("llm_quota.gateway.urls")),
    path("api/llm-quota/", include("llm_quota.reporting.urls")),
]
