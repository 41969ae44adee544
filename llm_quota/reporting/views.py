"""The usage API under ``api/llm-quota/``: a user's own usage, history and the tiers.

Permissions run before the view body, so an unauthenticated, out-of-scope or
non-staff request is refused before any Redis command. No endpoint takes another
user's id except the staff one: a user can only ever read their own usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404
from redis.exceptions import RedisError
from rest_framework.authentication import BaseAuthentication
from rest_framework.generics import GenericAPIView, ListAPIView
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from llm_quota.conf import quota_settings
from llm_quota.drf.permissions import HasScope
from llm_quota.exceptions import QuotaUnavailable
from llm_quota.ledger.default import get_ledger
from llm_quota.models import ApiKey, Team, Tier, UsageSnapshot
from llm_quota.quota import runaway
from llm_quota.reporting.key_views import with_api_keys
from llm_quota.reporting.live_usage import usage_report
from llm_quota.reporting.serializers import (
    KeyResumeSerializer,
    ResumeSerializer,
    TeamResumeSerializer,
    TierSerializer,
    UsageReportSerializer,
    UsageSnapshotSerializer,
    UserUsageReportSerializer,
)

if TYPE_CHECKING:
    from rest_framework.permissions import _PermissionClass  # the stubs' alias


class UsageScopeMixin:
    # Bearer llmq_... too (contract section 9).
    authentication_classes: Sequence[type[BaseAuthentication]] = with_api_keys()
    permission_classes: Sequence[_PermissionClass] = [IsAuthenticated, HasScope]

    @property
    def required_scopes(self) -> list[str]:
        # Read per request, so a changed USAGE_SCOPE setting applies without a restart.
        return [quota_settings.USAGE_SCOPE]


def _report(user_pk: Any) -> dict[str, Any]:
    try:
        return usage_report(user_pk)
    except RedisError as exc:
        raise QuotaUnavailable() from exc


class UsageView(UsageScopeMixin, GenericAPIView):
    """The caller's tier, limits, live usage this period, what remains, and its cost."""

    serializer_class = UsageReportSerializer

    def get(self, request: Request) -> Response:
        return Response(self.get_serializer(_report(request.user.pk)).data)


class UsageHistoryPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class UsageHistoryView(UsageScopeMixin, ListAPIView):
    """The caller's monthly snapshots per model, newest first (as of the last snapshot)."""

    serializer_class = UsageSnapshotSerializer
    pagination_class = UsageHistoryPagination

    def get_queryset(self) -> QuerySet[UsageSnapshot]:
        pk: Any = self.request.user.pk  # authenticated (permission_classes)
        return UsageSnapshot.objects.filter(user_id=pk).order_by("-period", "model")


def _user_or_404(user_id: str) -> Any:
    User = get_user_model()
    try:
        pk = User._meta.pk.to_python(user_id)
        return User._default_manager.get(pk=pk)
    except (ValidationError, ValueError, User.DoesNotExist) as exc:
        raise Http404("No such user.") from exc


class UserUsageView(GenericAPIView):
    """Staff only: any user's usage report, in the same shape as ``/usage/``."""

    permission_classes = [IsAdminUser]
    serializer_class = UserUsageReportSerializer

    def get(self, request: Request, user_id: str) -> Response:
        user = _user_or_404(user_id)
        body = _report(user.pk)
        body["user"] = {"id": str(user.pk), "username": user.get_username()}
        return Response(self.get_serializer(body).data)


class TierListView(ListAPIView):
    """Every tier with its limits: what a user may upgrade to."""

    permission_classes = [IsAuthenticated]
    serializer_class = TierSerializer
    pagination_class = None
    queryset = Tier.objects.select_related("upgrade_to").order_by("name")


class UserResumeView(GenericAPIView):
    """Staff only: end a user's burn-rate pause (contract §11). ``was_paused`` says
    whether there was one; either way the breaker waits a minute before it may trip
    again, until the spend that tripped it has left the window."""

    permission_classes = [IsAdminUser]
    serializer_class = ResumeSerializer

    def post(self, request: Request, user_id: str) -> Response:
        user = _user_or_404(user_id)
        try:
            was_paused = runaway.resume(get_ledger(), user.pk)
        except RedisError as exc:
            raise QuotaUnavailable() from exc
        body = {"user": {"id": str(user.pk), "username": user.get_username()}}
        return Response(self.get_serializer({**body, "was_paused": was_paused}).data)


class KeyResumeView(GenericAPIView):
    """Staff only: end an API key's burn-rate pause (contract §11), as
    ``UserResumeView`` a user's; the key's user is not paused by it."""

    permission_classes = [IsAdminUser]
    serializer_class = KeyResumeSerializer

    def post(self, request: Request, key_id: int) -> Response:
        key = ApiKey.objects.select_related("user").filter(pk=key_id).first()
        if key is None:
            raise Http404("No such API key.")
        try:
            was_paused = runaway.resume_key(get_ledger(), key.user_id, key.pk)
        except RedisError as exc:
            raise QuotaUnavailable() from exc
        user = {"id": str(key.user_id), "username": key.user.get_username()}
        body = {"api_key": str(key.pk), "user": user, "was_paused": was_paused}
        return Response(self.get_serializer(body).data)


class TeamResumeView(GenericAPIView):
    """Staff only: end a team's burn-rate pause (contract §11), as ``UserResumeView``
    a user's."""

    permission_classes = [IsAdminUser]
    serializer_class = TeamResumeSerializer

    def post(self, request: Request, slug: str) -> Response:
        team = Team.objects.filter(slug=slug).first()
        if team is None:
            raise Http404("No such team.")
        try:
            was_paused = runaway.resume_team(get_ledger(), team.pk)
        except RedisError as exc:
            raise QuotaUnavailable() from exc
        return Response(self.get_serializer({"team": team.slug, "was_paused": was_paused}).data)
