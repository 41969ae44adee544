"""Refusals, as DRF exceptions so DRF renders them and the gateway can reshape them.

Each carries what a client needs to act: the limit that blocked, when to retry
(whole seconds, rounded up) and where to upgrade.
"""

from __future__ import annotations

from typing import Any

from rest_framework import status
from rest_framework.exceptions import APIException, ErrorDetail, PermissionDenied, Throttled

from llm_quota.durations import human_duration


class RefusalBody(dict):
    """A refusal's ``detail``: ``{"detail", "limit", "retry_after", "upgrade"}``.

    DRF's default exception handler renders a dict ``detail`` as the body, so a DRF view
    answers all four keys with no handler of ours. ``refusal`` is the exception, for
    ``LLMQuotaMiddleware`` to add the headers the handler knows nothing of
    (``x-should-retry``, the rate-limit headers) to the response it built."""

    refusal: QuotaExceeded


class QuotaExceeded(Throttled):
    """429: a limit refused the request. ``error_type`` is OpenAI's error type."""

    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        limit: str,
        retry_after: int,
        *,
        upgrade: dict[str, str] | None = None,
        decision: Any = None,
        message: str | None = None,
    ) -> None:
        self.limit = limit
        self.retry_after = max(1, int(retry_after))
        self.upgrade = upgrade
        self.decision = decision
        text = message or self.describe(limit, self.retry_after, upgrade)
        super().__init__(wait=self.retry_after, detail=text, code=self.default_code)
        # DRF appended "Expected available in N seconds" to detail; keep ours exact, and
        # a dict, so DRF's default handler answers every key (``RefusalBody``).
        self.message = text
        body = RefusalBody(
            detail=ErrorDetail(text, self.default_code),
            limit=limit,
            retry_after=self.retry_after,
            upgrade=upgrade,
        )
        body.refusal = self
        self.detail = body

    def __str__(self) -> str:
        return self.message

    @staticmethod
    def describe(limit: str, retry_after: int, upgrade: dict[str, str] | None) -> str:
        # In words for the person reading it; ``retry_after`` and the headers keep the
        # seconds as a number for the program.
        text = f"Limit '{limit}' reached. Retry after {human_duration(retry_after)}."
        if upgrade:
            text += f" Upgrade to the '{upgrade['tier']}' tier for more"
            text += f": {upgrade['url']}" if upgrade.get("url") else "."
        return text


class RateLimited(QuotaExceeded):
    """Request, concurrency or per-minute token limits: retrying later works."""


class BudgetExceeded(QuotaExceeded):
    """Day, month, global or per-request budgets: don't retry, upgrade or wait it out."""

    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class BurnRateExceeded(BudgetExceeded):
    """The caller spends far faster than its own baseline and is paused (contract §11):
    a retry before the pause ends is refused again, and staff may resume it sooner."""

    default_code = "burn_rate_exceeded"

    @staticmethod
    def describe(limit: str, retry_after: int, upgrade: dict[str, str] | None) -> str:
        return (
            "Spending far faster than this account usually does: paused for "
            f"{human_duration(retry_after)} (a runaway loop?). Staff can resume it sooner."
        )


class InsufficientScope(PermissionDenied):
    default_code = "insufficient_scope"
    default_detail = "Your token lacks the scope this endpoint requires."


class ModelNotAllowed(PermissionDenied):
    default_code = "model_not_allowed"
    default_detail = "Your tier does not allow this model."


class QuotaBlocked(PermissionDenied):
    default_code = "user_blocked"
    default_detail = "LLM access is blocked for this account."


class TeamNotAllowed(PermissionDenied):
    """403: the request names a team (``OpenAI-Organization``, ``team=``) the caller is
    not a member of, or one that does not exist: the two are not told apart."""

    default_code = "team_not_allowed"
    default_detail = "You are not a member of this team."


class TeamBlocked(PermissionDenied):
    default_code = "team_blocked"
    default_detail = "LLM access is blocked for this team."


class InvalidRequest(APIException):
    """400 ``invalid_request_error``, as OpenAI answers it; ``param`` names the field."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_request_error"
    default_detail = "Invalid request."

    def __init__(
        self, detail: str | None = None, *, code: str | None = None, param: str | None = None
    ):
        super().__init__(detail=detail, code=code)
        self.param = param
        self.error_code = code or self.default_code


class UnknownModel(InvalidRequest):
    default_code = "model_not_found"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, code="model_not_found", param="model")


class QuotaUnavailable(APIException):
    """503: Redis is unreachable and ``FAIL_OPEN`` is off."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "quota_unavailable"
    default_detail = "The quota service is unavailable; try again shortly."

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__()
        self.wait = max(1, int(retry_after))
        self.retry_after = self.wait
