"""The team endpoints under ``api/llm-quota/teams/`` (contract section 10): the caller's
teams, and a team's live usage for its admins and staff. A team one is not a member of
is a 404, whether or not it exists."""

from __future__ import annotations

from typing import Any, cast

from django.http import Http404
from redis.exceptions import RedisError
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import GenericAPIView, ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from llm_quota.exceptions import QuotaUnavailable
from llm_quota.models import Team, TeamMembership
from llm_quota.reporting.key_views import with_api_keys
from llm_quota.reporting.team_usage import team_usage_report
from llm_quota.rules.teams import team_policy


class TeamMembershipSerializer(serializers.ModelSerializer):
    slug = serializers.CharField(source="team.slug")
    name = serializers.CharField(source="team.name")
    tier = serializers.CharField(source="team.tier.name")

    class Meta:
        model = TeamMembership
        fields = ("slug", "name", "tier", "role")


class TeamUsageSerializer(serializers.Serializer):
    team = serializers.CharField()
    tier = serializers.CharField()
    period = serializers.DictField(child=serializers.DateTimeField())
    limits = serializers.DictField(child=serializers.IntegerField(allow_null=True))
    usage = serializers.DictField(child=serializers.IntegerField())
    remaining = serializers.DictField(child=serializers.IntegerField(allow_null=True))
    by_model = serializers.ListField(child=serializers.DictField())
    by_member = serializers.ListField(child=serializers.DictField())
    cost_usd = serializers.DecimalField(max_digits=20, decimal_places=6)
    upgrade = serializers.DictField(child=serializers.CharField(), allow_null=True)


class TeamListView(ListAPIView):
    """The caller's teams and their role in each."""

    authentication_classes = with_api_keys()
    permission_classes = [IsAuthenticated]
    serializer_class = TeamMembershipSerializer
    pagination_class = None

    def get_queryset(self) -> Any:
        return (
            TeamMembership.objects.filter(user_id=cast(int, self.request.user.pk))
            .select_related("team", "team__tier")
            .order_by("team__slug")
        )


class TeamUsageView(GenericAPIView):
    """The team's live usage, by member and by model: its admins and staff only."""

    authentication_classes = with_api_keys()
    permission_classes = [IsAuthenticated]
    serializer_class = TeamUsageSerializer

    def get(self, request: Request, slug: str) -> Response:
        team = Team.objects.filter(slug=slug).first()
        if team is None:
            raise Http404("No such team.")
        if not request.user.is_staff:
            role = TeamMembership.objects.filter(
                team=team, user_id=cast(int, request.user.pk)
            ).first()
            if role is None:
                raise Http404("No such team.")
            if role.role != TeamMembership.ADMIN:
                raise PermissionDenied("Only the team's admins read its usage.")
        policy = team_policy(team.pk)
        assert policy is not None
        try:
            body = team_usage_report(policy)
        except RedisError as exc:
            raise QuotaUnavailable() from exc
        return Response(self.get_serializer(body).data)
