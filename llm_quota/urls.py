"""The app's URLs; the demo project mounts them at the root (contract section 6)."""

from django.urls import include, path

from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairView, ScopedTokenRefreshView

urlpatterns = [
    path("api/token/", ScopedTokenObtainPairView.as_view(), name="token_obtain_pair"),
    path("api/token/refresh/", ScopedTokenRefreshView.as_view(), name="token_refresh"),
    path("v1/", include("llm_quota.gateway.urls")),
    path("api/llm-quota/", include("llm_quota.reporting.urls")),
]
