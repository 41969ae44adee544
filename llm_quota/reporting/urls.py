"""The usage API, mounted under ``api/llm-quota/`` by ``llm_quota.urls``."""

from django.urls import path

from llm_quota.reporting.views import (
    TierListView,
    UsageHistoryView,
    UsageView,
    UserResumeView,
    UserUsageView,
)

urlpatterns = [
    path("usage/", UsageView.as_view(), name="llm_quota_usage"),
    path("usage/history/", UsageHistoryView.as_view(), name="llm_quota_usage_history"),
    path("users/<str:user_id>/usage/", UserUsageView.as_view(), name="llm_quota_user_usage"),
    path("users/<str:user_id>/resume/", UserResumeView.as_view(), name="llm_quota_user_resume"),
    path("tiers/", TierListView.as_view(), name="llm_quota_tiers"),
]
