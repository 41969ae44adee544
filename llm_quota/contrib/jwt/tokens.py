"""The token endpoint: simplejwt serializers that put the tier's scopes into the access
token, and the views that serve them. The refresh serializer recomputes the claim, so
a refreshed token reflects the user's tier (or block) now, not at login.
"""

from __future__ import annotations

from typing import Any, cast

from django.contrib.auth import get_user_model
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt.serializers import TokenObtainPairSerializer, TokenRefreshSerializer
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import RefreshToken
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from llm_quota.conf import quota_settings
from llm_quota.contrib.jwt.throttling import TokenEndpointThrottle
from llm_quota.rules.policy import policy_for


def scope_claim(user: Any) -> str:
    return " ".join(policy_for(user).scopes)


class ScopedTokenObtainPairSerializer(TokenObtainPairSerializer):
    @classmethod
    def get_token(cls, user: Any) -> RefreshToken:
        # The pair serializer's token_class; simplejwt annotates the base class.
        token = cast(RefreshToken, super().get_token(user))
        token[quota_settings.SCOPE_CLAIM] = scope_claim(user)
        return token


class ScopedTokenRefreshSerializer(TokenRefreshSerializer):
    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # simplejwt reads the token's user with ``.get()``: a deleted user's refresh
        # token raised DoesNotExist, a 500. It is a credential that no longer works:
        # 401, as simplejwt answers for an inactive user.
        user_id = RefreshToken(attrs["refresh"]).payload.get(jwt_settings.USER_ID_CLAIM)
        users = get_user_model().objects.filter(**{jwt_settings.USER_ID_FIELD: user_id})
        user = users.first() if user_id else None
        if user_id and user is None:
            raise AuthenticationFailed(
                self.error_messages["no_active_account"], "no_active_account"
            )
        data = super().validate(attrs)
        access = RefreshToken(attrs["refresh"], verify=False).access_token
        access[quota_settings.SCOPE_CLAIM] = scope_claim(user) if user is not None else ""
        data["access"] = str(access)
        return data


class ScopedTokenObtainPairView(TokenObtainPairView):
    serializer_class = ScopedTokenObtainPairSerializer
    throttle_classes = [TokenEndpointThrottle]


class ScopedTokenRefreshView(TokenRefreshView):
    serializer_class = ScopedTokenRefreshSerializer
    throttle_classes = [TokenEndpointThrottle]
