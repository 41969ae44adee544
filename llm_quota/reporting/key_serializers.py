"""Serializers of the API key endpoints (contract section 9): what a new key may ask
for, what is shown once at creation, what a list shows (never the secret)."""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import serializers

from llm_quota.models import ApiKey, Team
from llm_quota.rules.policy import policy_for

KEY_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_day", "tokens_per_month")


class ApiKeySerializer(serializers.ModelSerializer):
    """A key as listed: its prefix, never its secret or hash."""

    scopes = serializers.ListField(
        child=serializers.CharField(), source="scope_list", read_only=True,
        help_text="Empty: the tier's scopes.",
    )  # fmt: skip
    team: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, help_text="The team the key charges, or null."
    )

    class Meta:
        model = ApiKey
        fields = (
            "id", "name", "prefix", "scopes", "team", "expires_at", "revoked_at",
            *KEY_LIMIT_FIELDS, "created_at", "last_used_at",
        )  # fmt: skip
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.ModelSerializer):
    """``POST /api/llm-quota/keys/``: a key's scopes never exceed its user's tier."""

    scopes = serializers.CharField(
        required=False, allow_blank=True, max_length=255,
        help_text="Space-separated; empty: the tier's (never more than it grants).",
    )  # fmt: skip
    team = serializers.CharField(required=False, allow_null=True, default=None)

    class Meta:
        model = ApiKey
        fields = ("name", "scopes", "team", "expires_at", *KEY_LIMIT_FIELDS)

    def validate_scopes(self, value: str) -> str:
        scopes = value.split()
        granted = set(policy_for(self.context["request"].user).scopes)
        beyond = sorted(set(scopes) - granted)
        if beyond:
            raise serializers.ValidationError(
                f"Your tier does not grant {' '.join(beyond)}; a key cannot hold more."
            )
        return " ".join(scopes)

    def validate_team(self, value: Any) -> Team | None:
        """A team's slug; the caller must be a member (a key charges that team)."""
        if value in (None, ""):
            return None
        team = Team.objects.filter(
            slug=value, memberships__user_id=self.context["request"].user.pk
        ).first()
        if team is None:
            raise serializers.ValidationError("You are not a member of this team.")
        return team

    def validate_expires_at(self, value: Any) -> Any:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("A key's expiry must be in the future.")
        return value

    def create(self, validated_data: dict[str, Any]) -> ApiKey:
        key = ApiKey(user=self.context["request"].user, **validated_data)
        self.plaintext = key.issue()
        key.save()
        return key

    def to_representation(self, key: ApiKey) -> dict[str, Any]:
        """The 201 body: the key itself, shown this once."""
        return {
            "id": key.pk,
            "name": key.name,
            "prefix": key.prefix,
            "key": self.plaintext,
            "scopes": key.scope_list,
            "team": key.team.slug if key.team else None,
            "expires_at": serializers.DateTimeField().to_representation(key.expires_at)
            if key.expires_at
            else None,
            "created_at": serializers.DateTimeField().to_representation(key.created_at),
            **{name: getattr(key, name) for name in KEY_LIMIT_FIELDS},
        }


class KeyUsageSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField()
    period = serializers.DictField(child=serializers.DateTimeField())
    limits = serializers.DictField(child=serializers.IntegerField(allow_null=True))
    usage = serializers.DictField(child=serializers.IntegerField())
    remaining = serializers.DictField(child=serializers.IntegerField(allow_null=True))
    last_used_at = serializers.DateTimeField(allow_null=True)
