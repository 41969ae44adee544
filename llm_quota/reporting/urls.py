"""The usage API, mounted under ``api/llm-quota/`` by ``llm_quota.urls``."""

from django.urls import path

from llm_quota.reporting.key_views import ApiKeyDetailView, ApiKeyListView, ApiKeyUsageView
from llm_quota.reporting.team_views import TeamListView, TeamUsageView
from llm_quota.reporting.views import (
    KeyResumeView,
    TeamResumeView,
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
    path("keys/", ApiKeyListView.as_view(), name="llm_quota_keys"),
    path("keys/<int:key_id>/", ApiKeyDetailView.as_view(), name="llm_quota_key"),
    path("keys/<int:key_id>/usage/", ApiKeyUsageView.as_view(), name="llm_quota_key_usage"),
    path("keys/<int:key_id>/resume/", KeyResumeView.as_view(), name="llm_quota_key_resume"),
    path("teams/", TeamListView.as_view(), name="llm_quota_teams"),
    path("teams/<slug:slug>/usage/", TeamUsageView.as_view(), name="llm_quota_team_usage"),
    path("teams/<slug:slug>/resume/", TeamResumeView.as_view(), name="llm_quota_team_resume"),
]
