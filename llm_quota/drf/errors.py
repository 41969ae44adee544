"""Errors in OpenAI's shape, so any OpenAI SDK raises the right exception class.

``{"error": {"message", "type", "code", "param"}}``, as the ``/v1/`` API promises. The SDKs
pick the exception class from the status (401 ``AuthenticationError``, 403
``PermissionDeniedError``, 429 ``RateLimitError``...) and decide whether to retry
from ``x-should-retry`` and ``Retry-After``, so those headers matter as much as
the body: a budget refusal says ``x-should-retry: false`` because retrying cannot
help before the period ends.

``exception_handler`` is a DRF exception handler (``get_exception_handler`` of the
gateway's views); ``response_for_exception`` serves ``@quota_gated`` and the async view too.
"""

from __future__ import annotations

import math
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status

from llm_quota.drf.headers import refusal_headers
from llm_quota.exceptions import (
    InvalidRequest,
    QuotaExceeded,
    QuotaUnavailable,
)


def error_body(
    message: str,
    *,
    type: str,
    code: str | None = None,
    param: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON body of an error: OpenAI's four keys, plus any extra ones."""
    return {"error": {"message": message, "type": type, "code": code, "param": param, **extra}}


def error_response(
    status_code: int,
    message: str,
    *,
    type: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JsonResponse:
    response = JsonResponse(
        error_body(message, type=type, code=code, param=param, **extra), status=status_code
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def message_of(detail: Any) -> str:
    """DRF details are strings, lists or dicts (field errors, simplejwt's token errors)."""
    if isinstance(detail, dict):
        if "detail" in detail:
            return message_of(detail["detail"])
        return "; ".join(f"{key}: {message_of(value)}" for key, value in detail.items())
    if isinstance(detail, list | tuple):
        return " ".join(message_of(item) for item in detail)
    return str(detail)


def _quota_exceeded(exc: QuotaExceeded) -> JsonResponse:
    extra: dict[str, Any] = {"limit": exc.limit, "retry_after": exc.retry_after}
    if exc.upgrade:
        extra["upgrade"] = exc.upgrade
    return error_response(
        status.HTTP_429_TOO_MANY_REQUESTS,
        exc.message,
        type=exc.error_type,
        code=exc.default_code,
        headers=refusal_headers(exc),
        **extra,
    )


def response_for_exception(exc: BaseException) -> JsonResponse | None:
    """The OpenAI-shaped response for an API exception, or None for a real bug."""
    if isinstance(exc, RequestDataTooBig):
        return error_response(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            "The request body is larger than this server accepts (DATA_UPLOAD_MAX_MEMORY_SIZE).",
            type="invalid_request_error",
            code="request_too_large",
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None
    if isinstance(exc, QuotaExceeded):
        return _quota_exceeded(exc)
    message = message_of(exc.detail)
    headers: dict[str, str] = {}
    if isinstance(exc, QuotaUnavailable):
        headers["Retry-After"] = str(exc.retry_after)
        return error_response(
            exc.status_code, message, type="service_unavailable", code="quota_unavailable",
            headers=headers,
        )  # fmt: skip
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        auth_header = getattr(exc, "auth_header", None)
        if auth_header:
            headers["WWW-Authenticate"] = auth_header
        missing = isinstance(exc, exceptions.NotAuthenticated)
        return error_response(
            status.HTTP_401_UNAUTHORIZED,
            "No API key (an access token from /api/token/) was provided."
            if missing
            else f"Invalid API key: {message}",
            type="invalid_request_error",
            code="missing_api_key" if missing else "invalid_api_key",
            headers=headers,
        )
    if isinstance(exc, exceptions.PermissionDenied):
        return error_response(
            status.HTTP_403_FORBIDDEN,
            message,
            type="permission_error",
            code=_code(exc, "permission_denied"),
        )
    if isinstance(exc, exceptions.Throttled):
        # Another throttle of the host's: still a 429 with a whole-second Retry-After.
        # Throttled.__init__ sets ``wait``; the stubs don't declare it.
        wait = max(1, math.ceil(exc.wait or 1))  # type: ignore[attr-defined]
        return error_response(
            status.HTTP_429_TOO_MANY_REQUESTS,
            message,
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )
    param = exc.param if isinstance(exc, InvalidRequest) else None
    code = exc.error_code if isinstance(exc, InvalidRequest) else _code(exc, None)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, message, type=kind, code=code, param=param)


def _code(exc: exceptions.APIException, default: str | None) -> str | None:
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else default


def exception_handler(exc: Exception, context: dict[str, Any]) -> JsonResponse | None:
    """DRF exception handler for the ``/v1/`` views: every error in OpenAI's shape."""
    return response_for_exception(exc)
