"""Serializers of the usage API: a user's usage report, their snapshots, the tiers. Output only.

Declared field by field, so the OpenAPI schema (drf-spectacular) documents the
exact shape clients get.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from llm_quota.models import LIMIT_FIELDS, Tier, UsageSnapshot
from llm_quota.reporting.cost import cost_usd


def _limit(help_text: str) -> serializers.IntegerField:
    return serializers.IntegerField(allow_null=True, help_text=help_text)


class PeriodSerializer(serializers.Serializer):
    start = serializers.DateTimeField(help_text="First instant of the calendar month.")
    end = serializers.DateTimeField(help_text="First instant of the next month.")


class LimitsSerializer(serializers.Serializer):
    requests_per_minute = _limit("Sliding 60 s; null = unlimited.")
    tokens_per_minute = _limit("Base tokens, sliding 60 s; null = unlimited.")
    tokens_per_day = _limit("Base tokens per calendar day; null = unlimited.")
    tokens_per_month = _limit("Base tokens per calendar month; null = unlimited.")
    max_concurrent_requests = _limit("Calls in flight; null = unlimited.")
    max_tokens_per_request = _limit("Base tokens one request may reserve; null = unlimited.")


class LiveUsageSerializer(serializers.Serializer):
    tokens_today = serializers.IntegerField(help_text="Base tokens used and reserved today.")
    tokens_this_month = serializers.IntegerField(
        help_text="Base tokens used and reserved this month."
    )
    reserved = serializers.IntegerField(help_text="Base tokens held by calls in flight.")
    requests_this_minute = serializers.IntegerField()


class RemainingSerializer(serializers.Serializer):
    requests_per_minute = _limit("Requests left in the sliding minute.")
    tokens_per_minute = _limit("Base tokens left in the sliding minute.")
    tokens_per_day = _limit("Base tokens left today.")
    tokens_per_month = _limit("Base tokens left this month.")
    max_concurrent_requests = _limit("Calls that may start now.")


class ModelUsageSerializer(serializers.Serializer):
    model = serializers.CharField()
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    base_tokens = serializers.IntegerField()


class UpgradeSerializer(serializers.Serializer):
    tier = serializers.CharField()
    url = serializers.CharField(allow_blank=True)


class UsageReportSerializer(serializers.Serializer):
    tier = serializers.CharField(allow_null=True)
    period = PeriodSerializer()
    limits = LimitsSerializer()
    usage = LiveUsageSerializer()
    remaining = RemainingSerializer()
    by_model = ModelUsageSerializer(many=True, help_text="Settled usage this month.")
    cost_usd = serializers.DecimalField(
        max_digits=20, decimal_places=6, help_text="Settled usage this month, in USD."
    )
    upgrade = UpgradeSerializer(allow_null=True)


class UserRefSerializer(serializers.Serializer):
    id = serializers.CharField()
    username = serializers.CharField()


class UserUsageReportSerializer(UsageReportSerializer):
    user = UserRefSerializer()


class ResumeSerializer(serializers.Serializer):
    user = UserRefSerializer()
    was_paused = serializers.BooleanField(
        help_text="Whether the user was paused by the burn-rate breaker."
    )


class KeyResumeSerializer(serializers.Serializer):
    api_key = serializers.CharField(help_text="The API key's id.")
    user = UserRefSerializer()
    was_paused = serializers.BooleanField(
        help_text="Whether the key was paused by its own burn-rate breaker."
    )


class TeamResumeSerializer(serializers.Serializer):
    team = serializers.SlugField(help_text="The team's slug.")
    was_paused = serializers.BooleanField(
        help_text="Whether the team was paused by its own burn-rate breaker."
    )


class CostField(serializers.DecimalField):
    """Dollars of a base-token count, in the same decimal string form as the report."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_digits=20, decimal_places=6, read_only=True, **kwargs)

    def to_representation(self, value: Any) -> Any:
        return super().to_representation(cost_usd(value))


class UsageSnapshotSerializer(serializers.ModelSerializer):
    cost_usd = CostField(source="base_tokens", help_text="USD of base_tokens.")

    class Meta:
        model = UsageSnapshot
        fields = (
            "period", "model", "requests", "input_tokens", "output_tokens", "base_tokens",
            "cost_usd", "updated_at",
        )  # fmt: skip


class TierSerializer(serializers.ModelSerializer):
    allowed_models = serializers.ListField(
        child=serializers.CharField(), source="model_patterns", help_text="Empty: every model."
    )
    scopes = serializers.ListField(child=serializers.CharField(), source="scope_list")
    upgrade_to: serializers.SlugRelatedField[Tier] = serializers.SlugRelatedField(
        slug_field="name", read_only=True
    )

    class Meta:
        model = Tier
        fields = (
            "name", *LIMIT_FIELDS, "allowed_models", "scopes", "soft_limit_percent",
            "upgrade_to", "upgrade_url", "is_default",
        )  # fmt: skip
        read_only_fields = fields
