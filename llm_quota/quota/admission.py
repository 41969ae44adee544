"""``admit``: the one function every adapter calls to let an LLM call through.

Like django-ratelimit's ``is_ratelimited``, the throttle, the middleware, the context
manager and the gateway are thin wrappers over it. It prices the request, applies
the static checks that need no Redis (blocked user, allowed model, per-request
budget, context window), then asks the ledger once. A refusal is raised as an
exception that DRF renders; an admission returns the ``Reservation`` to settle.

``aestimate_request``/``aadmit``/``asettle``/``arelease`` are the same steps for async
code: the checks and the reading of the decision are shared, the ledger is the
``AsyncLedger`` (no thread), and the ORM is read in a thread only on a cache miss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine
from typing import Any, NamedTuple

from asgiref.sync import sync_to_async
from rest_framework.exceptions import NotAuthenticated

from llm_quota import signals
from llm_quota.conf import quota_settings
from llm_quota.exceptions import (
    BudgetExceeded,
    InvalidRequest,
    ModelNotAllowed,
    QuotaBlocked,
    RateLimited,
)
from llm_quota.ledger import keys
from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.connections import REDIS_ERRORS
from llm_quota.ledger.default import current_ledger, get_async_ledger, get_ledger
from llm_quota.ledger.replies import BUDGET_LIMITS, Decision, Reservation, Settlement
from llm_quota.ledger.resilience import BlindRefusal, metered, outage
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import alerts
from llm_quota.rules.accounting import ActualUsage, Estimate, Price
from llm_quota.rules.estimation import count_messages, counts_quickly, prompt_bounds
from llm_quota.rules.policy import UserPolicy, apolicy_for, policy_for
from llm_quota.rules.pricing import aprice_for, price_for

logger = logging.getLogger("llm_quota")

#: Retry-After for a request bigger than the tier allows at all: waiting won't help,
#: but every 429 carries the header and a minute is an honest "not soon".
PER_REQUEST_RETRY = 60
#: No model writes a million tokens in one answer; a larger cap is a bug or an attack,
#: refused even where the price row gives no context window to check against.
MAX_OUTPUT_TOKENS = 1_000_000
#: A prompt whose byte count (an upper bound of its tokens in any encoding) is above
#: this is first reserved on that bound: tokenizing 100k tokens takes ~40 ms, and
#: when the bound fits, or even the prompt's lower bound is refused, the exact count
#: cannot change the answer. Below it counting costs under ~3 ms and is always done.
LAZY_COUNT_ABOVE = 32_768


def estimate_request(
    model: str,
    *,
    messages: Any = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    tools: Any = None,
) -> Estimate:
    """Price a request before the call: counted prompt plus the output cap."""
    _check_model_name(model)
    price = price_for(model)
    if prompt_tokens is None:
        _refuse_if_surely_too_long(price, messages, tools)
        prompt_tokens = count_messages(
            messages, model, encoding_name=price.encoding, tools=tools,
            stop_above=price.context_window,
        )  # fmt: skip
    return _estimate(price, prompt_tokens, max_tokens)


async def aestimate_request(
    model: str,
    *,
    messages: Any = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    tools: Any = None,
) -> Estimate:
    """``estimate_request`` for async code: a long prompt is counted in a thread."""
    _check_model_name(model)
    price = await aprice_for(model)
    if prompt_tokens is None:
        _refuse_if_surely_too_long(price, messages, tools)
        count_args = (messages, model)
        count_kwargs = {"encoding_name": price.encoding, "tools": tools}
        stop = {"stop_above": price.context_window}
        if counts_quickly(*count_args, **count_kwargs):
            prompt_tokens = count_messages(*count_args, **count_kwargs, **stop)
        else:
            prompt_tokens = await sync_to_async(count_messages, thread_sensitive=False)(
                *count_args, **count_kwargs, **stop
            )
    return _estimate(price, prompt_tokens, max_tokens)


def admit_request(
    user: Any,
    model: str,
    *,
    messages: Any = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    tools: Any = None,
    choices: int = 1,
    ledger: Ledger | None = None,
) -> tuple[Estimate, Decision]:
    """Price a request and admit it (``estimate_request`` + ``admit``), tokenizing a
    huge prompt only when its bounds leave the answer open.

    A prompt over ``LAZY_COUNT_ABOVE`` bytes is reserved on its byte count, without
    clamping, carrying its lower bound as a probe: if the bound fits, that is the
    reservation (pessimistic, corrected at settle); if even the lower bound is refused,
    so is the request; only in between is the prompt counted and reserved again.
    """
    bounded = _bounded_estimate(model, messages, prompt_tokens, max_tokens, tools)
    if bounded is not None:
        estimate, lower = bounded
        estimate = per_choice(estimate, choices)
        decision = _admit(user, estimate, ledger=ledger, probe=lower)
        if decision is not None:
            return estimate, decision
    estimate = estimate_request(
        model, messages=messages, prompt_tokens=prompt_tokens, max_tokens=max_tokens, tools=tools
    )
    estimate = per_choice(estimate, choices)
    return estimate, admit(user, estimate, ledger=ledger)


async def aadmit_request(
    user: Any,
    model: str,
    *,
    messages: Any = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    tools: Any = None,
    choices: int = 1,
    ledger: AsyncLedger | None = None,
) -> tuple[Estimate, Decision]:
    """``admit_request`` for async code."""
    bounded = await _abounded_estimate(model, messages, prompt_tokens, max_tokens, tools)
    if bounded is not None:
        estimate, lower = bounded
        estimate = per_choice(estimate, choices)
        decision = await _aadmit(user, estimate, ledger=ledger, probe=lower)
        if decision is not None:
            return estimate, decision
    estimate = await aestimate_request(
        model, messages=messages, prompt_tokens=prompt_tokens, max_tokens=max_tokens, tools=tools
    )
    estimate = per_choice(estimate, choices)
    return estimate, await aadmit(user, estimate, ledger=ledger)


def per_choice(estimate: Estimate, choices: int) -> Estimate:
    """``n`` completions of one prompt: the output cap is reserved once per choice."""
    if choices <= 1:
        return estimate
    return dataclasses.replace(estimate, max_output_tokens=estimate.max_output_tokens * choices)


def _bounded_estimate(
    model: str, messages: Any, prompt_tokens: int | None, max_tokens: int | None, tools: Any
) -> tuple[Estimate, int] | None:
    """The estimate on a huge prompt's byte bound and the prompt's lower bound, when
    the bound passes every check the exact count would (else None: count it)."""
    if prompt_tokens is not None or messages is None:
        return None
    _check_model_name(model)
    return _bounded(price_for(model), messages, max_tokens, tools)


async def _abounded_estimate(
    model: str, messages: Any, prompt_tokens: int | None, max_tokens: int | None, tools: Any
) -> tuple[Estimate, int] | None:
    if prompt_tokens is not None or messages is None:
        return None
    _check_model_name(model)
    return _bounded(await aprice_for(model), messages, max_tokens, tools)


def _bounded(
    price: Price, messages: Any, max_tokens: int | None, tools: Any
) -> tuple[Estimate, int] | None:
    lower, upper = prompt_bounds(messages, tools=tools)
    window = price.context_window
    if window is not None and lower >= window:
        raise _too_long(window, lower)
    if upper <= LAZY_COUNT_ABOVE:
        return None
    _check_max_tokens(max_tokens)
    output = price.default_max_output_tokens if max_tokens is None else max_tokens
    if window is not None and upper + output > window:
        return None  # near the context window: only the count can tell
    return Estimate(price, upper, output, prompt_exact=False), lower


def _refuse_if_surely_too_long(price: Price, messages: Any, tools: Any) -> None:
    """A prompt whose tokenizer-free lower bound already exceeds the context window is
    refused without tokenizing it; below that, counting stops at the window anyway
    (``stop_above``), so a huge prompt never costs more than the window's worth."""
    window = price.context_window
    if window is None:
        return
    lower, _upper = prompt_bounds(messages, tools=tools)
    if lower >= window:
        raise _too_long(window, lower)


def _too_long(window: int, counted: int) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {window} tokens; the prompt has more.",
        code="context_length_exceeded",
        param="messages",
    )


def _check_model_name(model: Any) -> None:
    if not keys.is_valid_model_name(model):
        raise InvalidRequest("'model' must be a model name.", param="model")


def _check_max_tokens(max_tokens: Any) -> None:
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise InvalidRequest("'max_tokens' must be a positive integer.", param="max_tokens")
    if max_tokens is not None and max_tokens > MAX_OUTPUT_TOKENS:
        raise InvalidRequest(
            f"'max_tokens' may be at most {MAX_OUTPUT_TOKENS}.", param="max_tokens"
        )


def _estimate(price: Price, prompt_tokens: int, max_tokens: int | None) -> Estimate:
    _check_max_tokens(max_tokens)
    window = price.context_window
    if window is not None and prompt_tokens >= window:
        # The count may have stopped early (stop_above): say "more", not a figure.
        raise _too_long(window, prompt_tokens)
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


def _refusal(policy: UserPolicy, limit: str, retry_after: int, decision: Any = None):
    error = BudgetExceeded if limit in BUDGET_LIMITS else RateLimited
    return error(limit, retry_after, upgrade=policy.upgrade, decision=decision)


def _refused_signal(user: Any, exc: Any) -> dict[str, Any]:
    return {
        "sender": type(exc), "user": user, "limit": exc.limit,
        "retry_after": exc.retry_after, "error_type": exc.error_type,
    }  # fmt: skip


def _refuse(user: Any, policy: UserPolicy, limit: str, retry_after: int, decision: Any = None):
    exc = _refusal(policy, limit, retry_after, decision)
    signals.quota_refused.send(**_refused_signal(user, exc))
    return exc


async def _arefuse(
    user: Any, policy: UserPolicy, limit: str, retry_after: int, decision: Any = None
):
    exc = _refusal(policy, limit, retry_after, decision)
    # Receivers may do I/O; asend runs sync ones in a thread, off the loop.
    await signals.quota_refused.asend(**_refused_signal(user, exc))
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


class _Admission(NamedTuple):
    """A request that passed the checks needing no Redis, ready for the ledger."""

    pk: Any
    policy: UserPolicy
    estimate: Estimate
    requested: int
    clamp: bool
    minimum: int


class _Refusal(Exception):
    """Internal: a limit refused; the caller raises it with the signal sent its way."""

    def __init__(self, limit: str, retry_after: int, decision: Any = None) -> None:
        self.limit, self.retry_after, self.decision = limit, retry_after, decision


def _prepare(pk: Any, policy: UserPolicy, estimate: Estimate) -> _Admission:
    """The static checks: blocked user, allowed model, per-request budget."""
    if policy.blocked:
        raise QuotaBlocked(policy.blocked_reason or None)
    if not policy.allows_model(estimate.model):
        raise ModelNotAllowed(
            f"Your tier '{policy.tier}' does not allow the model '{estimate.model}'."
        )
    clamp = bool(quota_settings.CLAMP_MAX_TOKENS)
    minimum = int(quota_settings.MIN_OUTPUT_TOKENS)
    requested = estimate.max_output_tokens
    cap = policy.limits.max_tokens_per_request
    if cap is not None:
        fitted = _fit_per_request(estimate, cap, clamp, minimum)
        if fitted is None:
            raise _Refusal("max_tokens_per_request", PER_REQUEST_RETRY)
        estimate = fitted
    return _Admission(pk, policy, estimate, requested, clamp, minimum)


def _unavailable(admission: _Admission, ledger: Any) -> Decision:
    """Redis is away: admit blind within the fallback limiter (``FAIL_OPEN``), or 503."""
    ledger = ledger or current_ledger()  # its clock names the periods charged later
    blind = outage().admit_blind(admission.pk, admission.policy.limits, admission.estimate, ledger)
    if isinstance(blind, BlindRefusal):
        raise _Refusal(blind.limit, blind.retry_after)
    return Decision(True, None, 0.0, blind, admission.requested)


def _needs_count(policy: UserPolicy, estimate: Estimate, probe: int | None) -> bool:
    """A reservation on a prompt's upper bound would be clamped by the per-request cap:
    only the exact count can say by how much."""
    cap = policy.limits.max_tokens_per_request
    return probe is not None and cap is not None and estimate.base_tokens > cap


def _reserve_options(admission: _Admission, probe: int | None) -> dict[str, Any]:
    """An upper-bound estimate is never clamped (the count might not need it); the
    probe carries the prompt's lower bound, clamped as the exact estimate would be."""
    return {
        "clamp": admission.clamp and probe is None,
        "min_output_tokens": admission.minimum,
        "probe_prompt_tokens": probe,
        "probe_clamp": admission.clamp,
    }


def _conclude(
    admission: _Admission, decision: Decision, probe: int | None = None
) -> Decision | None:
    if not decision.allowed and probe is not None:
        if decision.probe_limit is None:
            return None  # the lower bound would fit: count the prompt and ask again
        decision = dataclasses.replace(
            decision, limit=decision.probe_limit, retry_after=decision.probe_retry_after
        )
    if not decision.allowed:
        raise _Refusal(decision.limit or "unknown", decision.retry_after_seconds, decision)
    if admission.requested != decision.requested_max_tokens:
        # Report the clamp against what the caller asked for, not the fitted estimate.
        decision = dataclasses.replace(decision, requested_max_tokens=admission.requested)
    return decision


def admit(
    user: Any,
    estimate: Estimate,
    *,
    policy: UserPolicy | None = None,
    ledger: Ledger | None = None,
) -> Decision:
    """Reserve ``estimate`` for ``user`` or raise the refusal. Returns the admitted decision."""
    decision = _admit(user, estimate, policy=policy, ledger=ledger)
    assert decision is not None  # only a probe may leave the answer open
    return decision


def _admit(
    user: Any,
    estimate: Estimate,
    *,
    policy: UserPolicy | None = None,
    ledger: Ledger | None = None,
    probe: int | None = None,
) -> Decision | None:
    """``admit``; with ``probe`` (see ``admit_request``) None means "count exactly"."""
    pk = getattr(user, "pk", user)
    if pk is None:
        raise NotAuthenticated()
    policy = policy or policy_for(pk)
    if _needs_count(policy, estimate, probe):
        return None
    try:
        admission = _prepare(pk, policy, estimate)
        state = outage()
        if not state.may_call():
            return _unavailable(admission, ledger)
        try:
            ledger = ledger or get_ledger()
            decision = ledger.reserve(
                pk, policy.limits, admission.estimate, **_reserve_options(admission, probe)
            )
        except REDIS_ERRORS as exc:
            state.failed(exc)
            return _unavailable(admission, ledger)
        except BaseException:
            state.abandon()
            raise
        if state.answered():
            state.replay(ledger)
        return _conclude(admission, decision, probe)
    except _Refusal as refusal:
        raise _refuse(user, policy, refusal.limit, refusal.retry_after, refusal.decision) from None


async def _apk(user: Any) -> Any:
    """The user's pk without blocking the loop: an async view's ``request.user`` is a
    lazy object whose first touch reads the session and the user from the database."""
    from django.utils.functional import LazyObject, empty

    if isinstance(user, LazyObject) and user._wrapped is empty:
        return await sync_to_async(lambda: getattr(user, "pk", None))()
    return getattr(user, "pk", user)


async def aadmit(
    user: Any,
    estimate: Estimate,
    *,
    policy: UserPolicy | None = None,
    ledger: AsyncLedger | None = None,
) -> Decision:
    """``admit`` for async code, on the ``AsyncLedger``."""
    decision = await _aadmit(user, estimate, policy=policy, ledger=ledger)
    assert decision is not None  # only a probe may leave the answer open
    return decision


async def _aadmit(
    user: Any,
    estimate: Estimate,
    *,
    policy: UserPolicy | None = None,
    ledger: AsyncLedger | None = None,
    probe: int | None = None,
) -> Decision | None:
    pk = await _apk(user)
    if pk is None:
        raise NotAuthenticated()
    policy = policy or await apolicy_for(pk)
    if _needs_count(policy, estimate, probe):
        return None
    try:
        admission = _prepare(pk, policy, estimate)
        state = outage()
        if not state.may_call():
            return _unavailable(admission, ledger)
        try:
            ledger = ledger or await get_async_ledger()
            decision = await _reserve_to_the_end(
                ledger,
                ledger.reserve(
                    pk, policy.limits, admission.estimate, **_reserve_options(admission, probe)
                ),
            )
        except REDIS_ERRORS as exc:
            state.failed(exc)
            return _unavailable(admission, ledger)
        except BaseException:
            state.abandon()
            raise
        if state.answered():
            await state.areplay(ledger)
        return _conclude(admission, decision, probe)
    except _Refusal as refusal:
        raise (
            await _arefuse(user, policy, refusal.limit, refusal.retry_after, refusal.decision)
        ) from None


#: Releases of reservations whose requester was cancelled, kept until they finish
#: (the event loop holds only weak references to tasks).
_orphan_releases: set[asyncio.Task[Any]] = set()


async def _reserve_to_the_end(
    ledger: AsyncLedger, reserving: Coroutine[Any, Any, Decision]
) -> Decision:
    """Await a reserve that a cancellation (a client gone, a timeout) cannot cut short.

    Once the script is sent, Redis may admit the request whether or not anyone waits
    for the answer; an abandoned answer would hold its tokens and its concurrency slot
    for a whole ``RESERVATION_TTL``. So the reserve runs on, shielded, and whatever it
    admitted for a requester who left is released at once.
    """
    task = asyncio.ensure_future(reserving)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: _release_orphan(ledger, done))
        raise


def _release_orphan(ledger: AsyncLedger, done: asyncio.Future[Decision]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    reservation = done.result().reservation
    if reservation is None or reservation.unmetered:
        return
    releasing = asyncio.ensure_future(arelease(reservation, ledger=ledger))
    _orphan_releases.add(releasing)
    releasing.add_done_callback(_orphan_releases.discard)


def settle(reservation: Reservation, usage: Any, *, ledger: Ledger | None = None) -> Settlement:
    """Settle with an OpenAI ``usage`` (object or dict) or an ``ActualUsage``.

    While Redis is away the usage goes into the outage journal and is charged once it
    is back; so does the usage of a call admitted blind (``FAIL_OPEN``).
    """
    actual = usage if isinstance(usage, ActualUsage) else ActualUsage.from_openai(usage)
    state = outage()
    state.blind_call_ended(reservation)
    if not state.may_call():
        state.defer(reservation, actual)
        return Settlement(False, False, 0)
    try:
        ledger = ledger or get_ledger()
        settlement = ledger.settle(metered(reservation), actual)
    except REDIS_ERRORS as exc:
        state.failed(exc)
        logger.warning("could not settle reservation %s (%s): journaled", reservation.id, exc)
        state.defer(reservation, actual)
        return Settlement(False, False, 0)
    except BaseException:
        state.abandon()
        raise
    if state.answered():
        state.replay(ledger)
    alerts.after_settle(reservation, settlement, ledger)  # soft limit: no extra round trip
    return settlement


async def asettle(
    reservation: Reservation, usage: Any, *, ledger: AsyncLedger | None = None
) -> Settlement:
    """``settle`` for async code, on the ``AsyncLedger``."""
    actual = usage if isinstance(usage, ActualUsage) else ActualUsage.from_openai(usage)
    state = outage()
    state.blind_call_ended(reservation)
    if not state.may_call():
        state.defer(reservation, actual)
        return Settlement(False, False, 0)
    try:
        ledger = ledger or await get_async_ledger()
        settlement = await ledger.settle(metered(reservation), actual)
    except REDIS_ERRORS as exc:
        state.failed(exc)
        logger.warning("could not settle reservation %s (%s): journaled", reservation.id, exc)
        state.defer(reservation, actual)
        return Settlement(False, False, 0)
    except BaseException:
        state.abandon()
        raise
    if state.answered():
        await state.areplay(ledger)
    await _asoft_limit_alert(reservation, settlement, ledger)
    return settlement


async def _asoft_limit_alert(
    reservation: Reservation, settlement: Settlement, ledger: AsyncLedger
) -> None:
    """``alerts.after_settle`` off the loop, only for the settle that crosses the line."""
    if not settlement.settled or settlement.month_used is None:
        return
    try:
        policy = await apolicy_for(alerts.user_pk(reservation.user_id))
        if alerts.soft_limit_crossing(policy, settlement) is None:
            return
    except Exception:  # an alert may never fail a request
        logger.exception("soft-limit alert failed for user %s", reservation.user_id)
        return
    # Thread-sensitive, as Django asks of ORM code: receivers may write to the database,
    # and a connection opened in an executor thread would never be closed.
    await sync_to_async(
        lambda: alerts.after_settle(reservation, settlement, ledger.mirrors or get_ledger())
    )()


def release(reservation: Reservation, *, ledger: Ledger | None = None) -> bool:
    """Give the reservation back (the call failed). While Redis is away the release is
    journaled; were it lost, the reservation would still expire after RESERVATION_TTL."""
    state = outage()
    if reservation.unmetered:
        state.blind_call_ended(reservation)
        return False
    if not state.may_call():
        state.defer(reservation, None)
        return False
    try:
        ledger = ledger or get_ledger()
        released = ledger.release(reservation)
    except REDIS_ERRORS as exc:
        state.failed(exc)
        logger.warning("could not release reservation %s (%s): journaled", reservation.id, exc)
        state.defer(reservation, None)
        return False
    except BaseException:
        state.abandon()
        raise
    if state.answered():
        state.replay(ledger)
    return released


async def arelease(reservation: Reservation, *, ledger: AsyncLedger | None = None) -> bool:
    """``release`` for async code, on the ``AsyncLedger``."""
    state = outage()
    if reservation.unmetered:
        state.blind_call_ended(reservation)
        return False
    if not state.may_call():
        state.defer(reservation, None)
        return False
    try:
        ledger = ledger or await get_async_ledger()
        released = await ledger.release(reservation)
    except REDIS_ERRORS as exc:
        state.failed(exc)
        logger.warning("could not release reservation %s (%s): journaled", reservation.id, exc)
        state.defer(reservation, None)
        return False
    except BaseException:
        state.abandon()
        raise
    if state.answered():
        await state.areplay(ledger)
    return released


__all__ = [
    "Price",
    "aadmit",
    "aadmit_request",
    "admit",
    "admit_request",
    "aestimate_request",
    "arelease",
    "asettle",
    "estimate_request",
    "per_choice",
    "release",
    "settle",
]
