"""``admit``: the one function every adapter calls to let an LLM call through.

Like django-ratelimit's ``is_ratelimited``, the throttle, the middleware, the context
manager and the gateway are thin wrappers over it. It prices the request, applies
the static checks that need no Redis (blocked user, allowed model, per-request
budget, context window), then asks the ledger once. A refusal is raised as an
exception that DRF renders; an admission returns the ``Reservation`` to settle.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from redis.exceptions import RedisError
from rest_framework.exceptions import NotAuthenticated

from llm_quota import alerts, keys, signals
from llm_quota.accounting import ActualUsage, Estimate, Price
from llm_quota.conf import quota_settings
from llm_quota.estimation import count_messages
from llm_quota.exceptions import (
    BudgetExceeded,
    InvalidRequest,
    ModelNotAllowed,
    QuotaBlocked,
    QuotaUnavailable,
    RateLimited,
)
from llm_quota.policy import UserPolicy, policy_for
from llm_quota.pricing import price_for
from llm_quota.redis_ledger import (
    BUDGET_LIMITS,
    Decision,
    Ledger,
    Reservation,
    Settlement,
    get_ledger,
)

logger = logging.getLogger("llm_quota")

#: Retry-After for a request bigger than the tier allows at all: waiting won't help,
#: but every 429 carries the header and a minute is an honest "not soon".
PER_REQUEST_RETRY = 60
#: No model writes a million tokens in one answer; a larger cap is a bug or an attack,
#: refused even where the price row gives no context window to check against.
MAX_OUTPUT_TOKENS = 1_000_000


def estimate_request(
    model: str,
    *,
    messages: Any = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    tools: Any = None,
) -> Estimate:
    """Price a request before the call: counted prompt plus the output cap."""
    if not keys.is_valid_model_name(model):
        raise InvalidRequest("'model' must be a model name.", param="model")
    price = price_for(model)
    if prompt_tokens is None:
        prompt_tokens = count_messages(messages, model, encoding_name=price.encoding, tools=tools)
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise InvalidRequest("'max_tokens' must be a positive integer.", param="max_tokens")
    if max_tokens is not None and max_tokens > MAX_OUTPUT_TOKENS:
        raise InvalidRequest(
            f"'max_tokens' may be at most {MAX_OUTPUT_TOKENS}.", param="max_tokens"
        )
    window = price.context_window
    if window is not None and prompt_tokens >= window:
        raise InvalidRequest(
            f"This model's maximum context length is {window} tokens; the prompt has "
            f"{prompt_tokens}.",
            code="context_length_exceeded",
            param="messages",
        )
    if max_tokens is None:
        output = price.default_max_output_tokens
        if window is not None:
            output = min(output, window - prompt_tokens)
    else:
        output = max_tokens
        if window is not None and prompt_tokens + output > window:
            raise InvalidRequest(
                f"max_tokens {output} plus the prompt's {prompt_tokens} tokens exceed the "
                f"model's context length of {window}.",
                code="context_length_exceeded",
                param="max_tokens",
            )
    return Estimate(price=price, prompt_tokens=prompt_tokens, max_output_tokens=output)


def _refuse(user: Any, policy: UserPolicy, limit: str, retry_after: int, decision: Any = None):
    error = BudgetExceeded if limit in BUDGET_LIMITS else RateLimited
    exc = error(limit, retry_after, upgrade=policy.upgrade, decision=decision)
    signals.quota_refused.send(
        sender=error, user=user, limit=limit, retry_after=exc.retry_after,
        error_type=exc.error_type,
    )  # fmt: skip
    return exc


def _fit_per_request(estimate: Estimate, cap: int, clamp: bool, minimum: int) -> Estimate | None:
    """The estimate with its output lowered to fit ``cap`` base tokens, or None."""
    if estimate.base_tokens <= cap:
        return estimate
    price = estimate.price
    if not clamp or price.output_micro == 0:
        return None
    room = cap * 1_000_000 - estimate.prompt_micro
    output = min(room // price.output_micro, estimate.max_output_tokens)
    if output < min(minimum, estimate.max_output_tokens):
        return None
    return Estimate(price, estimate.prompt_tokens, output)


class _Outage:
    """Logs CRITICAL once per Redis outage, with how many requests went through blind."""

    def __init__(self) -> None:
        self.admitted_blind = 0
        self.lock = threading.Lock()

    def admitted(self, exc: Exception) -> None:
        with self.lock:
            self.admitted_blind += 1
            first = self.admitted_blind == 1
        if first:
            logger.critical("Redis unavailable (%s): FAIL_OPEN admits requests unmetered", exc)

    def recovered(self) -> None:
        if self.admitted_blind:
            with self.lock:
                count, self.admitted_blind = self.admitted_blind, 0
            logger.critical("Redis is back; %d requests were admitted unmetered", count)


outage = _Outage()


def _unmetered(user: Any, estimate: Estimate) -> Reservation:
    return Reservation(
        id=keys.reservation_id(),
        user_id=keys.user_id(getattr(user, "pk", user)),
        model=estimate.model,
        reserved=0,
        max_tokens=estimate.max_output_tokens,
        estimate=estimate,
        day="",
        month="",
        month_end_ms=0,
        uses_global=False,
        unmetered=True,
    )


def admit(
    user: Any,
    estimate: Estimate,
    *,
    policy: UserPolicy | None = None,
    ledger: Ledger | None = None,
) -> Decision:
    """Reserve ``estimate`` for ``user`` or raise the refusal. Returns the admitted decision."""
    pk = getattr(user, "pk", user)
    if pk is None:
        raise NotAuthenticated()
    policy = policy or policy_for(pk)
    if policy.blocked:
        raise QuotaBlocked(policy.blocked_reason or None)
    if not policy.allows_model(estimate.model):
        raise ModelNotAllowed(
            f"Your tier '{policy.tier}' does not allow the model '{estimate.model}'."
        )
    clamp = bool(quota_settings.CLAMP_MAX_TOKENS)
    minimum = int(quota_settings.MIN_OUTPUT_TOKENS)
    cap = policy.limits.max_tokens_per_request
    if cap is not None:
        fitted = _fit_per_request(estimate, cap, clamp, minimum)
        if fitted is None:
            raise _refuse(user, policy, "max_tokens_per_request", PER_REQUEST_RETRY)
        requested = estimate.max_output_tokens
        estimate = fitted
    else:
        requested = estimate.max_output_tokens
    ledger = ledger or get_ledger()
    try:
        decision = ledger.reserve(
            pk, policy.limits, estimate, clamp=clamp, min_output_tokens=minimum
        )
    except RedisError as exc:
        if quota_settings.FAIL_OPEN:
            outage.admitted(exc)
            reservation = _unmetered(pk, estimate)
            return Decision(True, None, 0.0, reservation, requested)
        logger.error("Redis unavailable (%s): FAIL_OPEN is off, refusing", exc)
        raise QuotaUnavailable() from exc
    outage.recovered()
    if not decision.allowed:
        raise _refuse(
            user, policy, decision.limit or "unknown", decision.retry_after_seconds, decision
        )
    if requested != decision.requested_max_tokens:
        # Report the clamp against what the caller asked for, not the fitted estimate.
        decision = dataclasses.replace(decision, requested_max_tokens=requested)
    return decision


def settle(reservation: Reservation, usage: Any, *, ledger: Ledger | None = None) -> Settlement:
    """Settle with an OpenAI ``usage`` (object or dict) or an ``ActualUsage``."""
    actual = usage if isinstance(usage, ActualUsage) else ActualUsage.from_openai(usage)
    if reservation.unmetered:
        return Settlement(False, False, 0)
    ledger = ledger or get_ledger()
    try:
        settlement = ledger.settle(reservation, actual)
    except RedisError:
        logger.exception("could not settle reservation %s", reservation.id)
        return Settlement(False, False, 0)
    alerts.after_settle(reservation, settlement, ledger)  # soft limit: no extra round trip
    return settlement


def release(reservation: Reservation, *, ledger: Ledger | None = None) -> bool:
    if reservation.unmetered:
        return False
    try:
        return (ledger or get_ledger()).release(reservation)
    except RedisError:
        # Not lost: the reservation expires after RESERVATION_TTL and gives its tokens back.
        logger.exception("could not release reservation %s", reservation.id)
        return False


__all__ = ["Price", "admit", "estimate_request", "release", "settle"]
