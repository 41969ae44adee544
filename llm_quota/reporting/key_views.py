"""The API key endpoints under ``api/llm-quota/keys/`` (contract section 9).

Managing keys (create, list, revoke) needs a JWT or a session, never a key: a leaked
key must not mint more keys or outlive its revocation. A key may read its own usage.
A caller only ever sees their own keys: another user's id is a 404.
"""

from __future__ import annotations

from typing import Any, cast

from django.db.models import QuerySet
from django.http import Http404
from django.utils import timezone
from redis.exceptions import RedisError
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import GenericAPIView, ListCreateAPIView
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from llm_quota.conf import quota_settings
from llm_quota.drf.api_keys import ApiKeyAuthentication, credential_of
from llm_quota.drf.permissions import HasScope
from llm_quota.exceptions import QuotaUnavailable
from llm_quota.models import ApiKey
from llm_quota.reporting.key_serializers import (
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    KeyUsageSerializer,
)
from llm_quota.reporting.key_usage import key_usage_report


def with_api_keys() -> list[Any]:
    """The host's authentication classes, with an API key accepted first."""
    # api_settings imports the dotted paths; the stubs type the setting as strings.
    configured = cast(list[Any], api_settings.DEFAULT_AUTHENTICATION_CLASSES)
    rest = [c for c in configured if c is not ApiKeyAuthentication]
    return [ApiKeyAuthentication, *rest]


class NotWithApiKey(BasePermission):
    """403 for a caller authenticated by an API key: keys do not manage keys."""

    message = "API keys cannot manage API keys; use a JWT or a session."

    def has_permission(self, request: Any, view: Any) -> bool:
        if credential_of(request.auth) is not None:
            raise PermissionDenied(self.message, code="api_key_not_allowed")
        return True


class ApiKeyListView(ListCreateAPIView):
    """``GET``: the caller's keys (never a secret). ``POST``: a new key, shown once."""

    authentication_classes = with_api_keys()
    permission_classes = [IsAuthenticated, NotWithApiKey]
    pagination_class = None

    def get_queryset(self) -> QuerySet[ApiKey]:
        keys = ApiKey.objects.filter(user_id=cast(int, self.request.user.pk)).select_related("team")
        return keys.order_by("-created_at")

    def get_serializer_class(self) -> Any:
        return ApiKeyCreateSerializer if self.request.method == "POST" else ApiKeySerializer


class ApiKeyDetailView(GenericAPIView):
    """``DELETE``: revoke the key; refused on its next request, in every process."""

    authentication_classes = with_api_keys()
    permission_classes = [IsAuthenticated, NotWithApiKey]
    serializer_class = ApiKeySerializer

    def delete(self, request: Request, key_id: int) -> Response:
        key = ApiKey.objects.filter(pk=key_id, user_id=cast(int, request.user.pk)).first()
        if key is None:
            raise Http404("No such API key.")
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])  # post_save: every process is told
        return Response(status=status.HTTP_204_NO_CONTENT)


class ApiKeyUsageView(GenericAPIView):
    """The key's live usage against its own limits. A key reads only its own."""

    authentication_classes = with_api_keys()
    permission_classes = [IsAuthenticated, HasScope]
    serializer_class = KeyUsageSerializer

    @property
    def required_scopes(self) -> list[str]:
        return [quota_settings.USAGE_SCOPE]

    def get(self, request: Request, key_id: int) -> Response:
        credential = credential_of(request.auth)
        if credential is not None and credential.id != key_id:
            raise Http404("No such API key.")
        key = ApiKey.objects.filter(pk=key_id, user_id=cast(int, request.user.pk)).first()
        if key is None:
            raise Http404("No such API key.")
        try:
            body = key_usage_report(key)
        except RedisError as exc:
            raise QuotaUnavailable() from exc
        return Response(self.get_serializer(body).data)
