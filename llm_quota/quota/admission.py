"""Admission and settlement: the one place that decides whether an LLM call goes
through, and how it is charged once it ran.

Like django-ratelimit's ``is_ratelimited``, every adapter (the throttle, the decorator,
the middleware, the context manager, the gateway) is a thin wrapper over it. Admitting
prices the request, applies the checks that need no Redis (blocked user, allowed model,
per-request budget, context window), then asks the ledger once. A refusal is raised as
an exception that DRF renders; an admission returns the ``Decision`` whose reservation
is settled or released later.

Each step is written once, as a plan (``*_plan``), and run by a thin driver: ``admit``,
``settle``, ``release`` here; ``aadmit``, ``asettle``, ``arelease`` on an event loop,
where the ORM and long tokenizing run in a thread and Redis on ``redis.asyncio``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar, cast

from django.utils.functional import LazyObject, empty
from rest_framework.exceptions import NotAuthenticated

from llm_quota import signals
from llm_quota.conf import quota_settings
from llm_quota.exceptions import (
    BudgetExceeded,
    BurnRateExceeded,
    InvalidRequest,
    ModelNotAllowed,
    QuotaBlocked,
    RateLimited,
)
from llm_quota.ledger import keys
from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.ops import LedgerOps
from llm_quota.ledger.plans import CURRENT_LEDGER, USE_LEDGER, Plan
from llm_quota.ledger.replies import (
    BUDGET_LIMITS,
    BURN_RATE_LIMITS,
    Decision,
    Reservation,
    Settlement,
)
from llm_quota.ledger.resilience import (
    BlindRefusal,
    lost_reservation,
    metered,
    outage,
    reply_lost_released,
    resilient,
)
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import alerts
from llm_quota.quota.drivers import Blocking, Notify, Shielded, arun, run
from llm_quota.rules.accounting import (
    ActualUsage,
    Estimate,
    Price,
    ReportedUsage,
    fewest_tokens,
)
from llm_quota.rules.api_keys import ApiKeyCredential, with_key
from llm_quota.rules.config_cache import MISSING, config_cache
from llm_quota.rules.estimation import (
    PromptBounds,
    PromptCount,
    bound_prompt,
    byte_bound,
    count_output,
    count_prompt,
    counts_quickly,
)
from llm_quota.rules.policy import UserPolicy, policy_for
from llm_quota.rules.pricing import price_for, price_in
from llm_quota.rules.teams import TeamPolicy, select_team, select_team_cached, with_team

T = TypeVar("T")

logger = logging.getLogger("llm_quota")

#: Retry-After for a request bigger than the tier allows at all: waiting won't help,
#: but every 429 carries the header and a minute is an honest "not soon".
PER_REQUEST_RETRY = 60
#: No model writes a million tokens in one answer; a larger cap is a bug or an attack,
#: refused even where the price row gives no context window to check against.
MAX_OUTPUT_TOKENS = 1_000_000
#: A prompt with more text than this (bytes, JSON fields included) is first reserved on
#: its tokenizer-free upper bound (``bound_prompt``): when the bound fits, or even the
#: prompt's lower bound is refused, the exact count cannot change the answer, and
#: tokenizing a long prompt costs far more than a reserve. Below it the prompt is always
#: counted (images and audio cost the same either way: they are never tokenized).
LAZY_COUNT_ABOVE = 32_768


# -- the drivers ---------------------------------------------------------------------


def estimate_request(model: str, **request: Any) -> Estimate:
    """Price a request before the call: counted prompt plus the output cap.

    ``request``: ``messages``, ``prompt_tokens`` (instead of messages), ``max_tokens``,
    and every other billed field of the body by its name (``tools``, ``functions``...).
    """
    return run(estimate_plan(model, **request))


async def aestimate_request(model: str, **request: Any) -> Estimate:
    return await arun(estimate_plan(model, **request))


def admit_request(
    user: Any, model: str, *, ledger: Ledger | None = None, **request: Any
) -> tuple[Estimate, Decision]:
    """Price a request and admit it (``estimate_request`` + ``admit``), tokenizing a
    huge prompt only when its bounds leave the answer open (``admit_request_plan``)."""
    return run(admit_request_plan(user, model, **request), ledger)


async def aadmit_request(
    user: Any, model: str, *, ledger: AsyncLedger | None = None, **request: Any
) -> tuple[Estimate, Decision]:
    return await arun(admit_request_plan(user, model, **request), ledger)


def admit(
    user: Any, estimate: Estimate, *, policy: UserPolicy | None = None, ledger: Ledger | None = None
) -> Decision:
    """Reserve ``estimate`` for ``user`` or raise the refusal."""
    return run(_decided(admit_plan(user, estimate, policy=policy)), ledger)


async def aadmit(
    user: Any,
    estimate: Estimate,
    *,
    policy: UserPolicy | None = None,
    ledger: AsyncLedger | None = None,
) -> Decision:
    return await arun(_decided(admit_plan(user, estimate, policy=policy)), ledger)


def settle(reservation: Reservation, usage: Any, *, ledger: Ledger | None = None) -> Settlement:
    """Settle with an OpenAI ``usage`` (object or dict) or an ``ActualUsage``; a count
    that cannot be charged is the reservation's (``usage_plan``)."""
    return run(settle_plan(reservation, usage), ledger)


async def asettle(
    reservation: Reservation, usage: Any, *, ledger: AsyncLedger | None = None
) -> Settlement:
    return await arun(settle_plan(reservation, usage), ledger)


def release(reservation: Reservation, *, ledger: Ledger | None = None) -> bool:
    """Give the reservation back (the call failed)."""
    return run(release_plan(reservation), ledger)


async def arelease(reservation: Reservation, *, ledger: AsyncLedger | None = None) -> bool:
    return await arun(release_plan(reservation), ledger)


# -- pricing -------------------------------------------------------------------------


def price_plan(model: str) -> Plan[Price]:
    """The model's price: from memory, else the database (in a thread, for async)."""
    rows = config_cache.peek("prices")
    if rows is MISSING:
        return (yield Blocking(price_for, (model,)))
    return price_in(rows, model)


def policy_plan(user: Any) -> Plan[UserPolicy]:
    """The user's policy: from memory, else the database (in a thread, for async)."""
    found = config_cache.peek(("policy", getattr(user, "pk", user)))
    if found is MISSING:
        return (yield Blocking(policy_for, (user,)))
    return found


def count_plan(function: Callable[..., T], text: Any, model: str, **options: Any) -> Plan[T]:
    """Tokens of ``text`` by ``function``; on an event loop a long text is counted in a
    thread (the async driver asks ``counts_quickly`` first; sync code just counts)."""
    quick = {k: v for k, v in options.items() if k != "stop_above"}
    return (
        yield Blocking(
            function,
            (text, model),
            options,
            thread_sensitive=False,
            inline=lambda: counts_quickly(text, model, **quick),
        )  # fmt: skip
    )


def estimate_plan(
    model: str,
    *,
    messages: Any = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    bounds: PromptBounds | None = None,
    **billed: Any,
) -> Plan[Estimate]:
    """``billed``: the body's other billed fields by name (``tools``, ``functions``...),
    counted with the messages. ``bounds``: the prompt's ``bound_prompt``, where the caller
    has them already."""
    _check_model_name(model)
    price = yield from price_plan(model)
    if prompt_tokens is not None:
        return _estimate(price, PromptCount(prompt_tokens, prompt_tokens), max_tokens)
    prompt = {"messages": messages, **billed}
    _refuse_if_surely_too_long(price, bounds or bound_prompt(prompt, model))
    count = yield from count_plan(
        count_prompt, prompt, model, encoding_name=price.encoding, stop_above=price.context_window
    )
    return _estimate(price, count, max_tokens)


def prompt_count_plan(model: str, prompt: Any, price: Price) -> Plan[int]:
    """The prompt tokens to charge for ``prompt`` (its billed fields by name) when the
    upstream said nothing: the count, its bounds held to the context window."""
    count = yield from count_plan(count_prompt, prompt, model, encoding_name=price.encoding)
    return charged_prompt(price, count)


def charged_prompt(price: Price, count: PromptCount) -> int:
    """The prompt tokens to reserve: the count, where the upstream bills a part that only
    the context window bounds (a file) the whole window, and a bound never more than
    the window (the upstream bills no prompt longer than that; it refuses it)."""
    window = price.context_window
    if count.unbounded:
        if window is None:
            raise InvalidRequest(
                f"The price of '{price.model}' has no context window, and nothing else bounds "
                "what a file part (or an earlier answer's audio) is billed.",
                code="unbounded_prompt",
                param="messages",
            )
        return window
    if window is not None and count.tokens > count.counted:
        return min(count.tokens, window)
    return count.tokens


def at_premium(estimate: Estimate, premium: Decimal | None) -> Estimate:
    """The prompt reserved as ``premium`` input tokens per token, rounded up: what it costs
    if the upstream bills it all at that premium (settle charges what it did bill)."""
    if premium is None or premium <= 1:
        return estimate
    scaled = -int(-(estimate.prompt_tokens * premium) // 1)
    return dataclasses.replace(estimate, prompt_tokens=scaled)


def per_choice(estimate: Estimate, choices: int) -> Estimate:
    """``n`` completions of one prompt: the output cap is reserved once per choice."""
    if choices <= 1:
        return estimate
    return dataclasses.replace(estimate, max_output_tokens=estimate.max_output_tokens * choices)


def _bounded(
    price: Price, bounds: PromptBounds, max_tokens: int | None
) -> tuple[Estimate, int] | None:
    """The estimate on a huge prompt's byte bound and the prompt's lower bound, when
    the bound passes every check the exact count would (else None: count it)."""
    lower, upper = bounds.lower, bounds.upper
    window = price.context_window
    if window is not None and lower >= window:
        raise _too_long(window)
    if bounds.countable <= LAZY_COUNT_ABOVE or bounds.unbounded:
        return None  # counting costs little (or only the count can bound it): count it
    _check_max_tokens(max_tokens)
    output = price.default_max_output_tokens if max_tokens is None else max_tokens
    if window is not None and upper + output > window:
        return None  # near the context window: only the count can tell
    return Estimate(price, upper, output, prompt_exact=False, prompt_floor=lower), lower


def _refuse_if_surely_too_long(price: Price, bounds: PromptBounds) -> None:
    """A prompt whose tokenizer-free lower bound already exceeds the context window is
    refused without tokenizing it; below that, counting stops at the window anyway
    (``stop_above``), so a huge prompt never costs more than the window's worth."""
    window = price.context_window
    if window is None:
        return
    if bounds[0] >= window:
        raise _too_long(window)


def _too_long(window: int) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {window} tokens; the prompt has more.",
        code="context_length_exceeded",
        param="messages",
    )


def _check_model_name(model: Any) -> None:
    if not keys.is_valid_model_name(model):
        raise InvalidRequest("'model' must be a model name.", param="model")


def _check_max_tokens(max_tokens: Any) -> None:
    """A cap of 0 is a call with no output at all (embeddings): only its input is priced."""
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
    ):
        raise InvalidRequest("'max_tokens' must be a non-negative integer.", param="max_tokens")
    if max_tokens is not None and max_tokens > MAX_OUTPUT_TOKENS:
        raise InvalidRequest(
            f"'max_tokens' may be at most {MAX_OUTPUT_TOKENS}.", param="max_tokens"
        )


def _estimate(price: Price, count: PromptCount, max_tokens: int | None) -> Estimate:
    """Only the counted part of the prompt can prove it too long for the window; its
    bounds (the worst image, a file) are held to the window (``charged_prompt``)."""
    _check_max_tokens(max_tokens)
    window = price.context_window
    counted = count.counted
    if window is not None and counted >= window:
        # The count may have stopped early (stop_above): say "more", not a figure.
        raise _too_long(window)
    prompt_tokens = charged_prompt(price, count)
    if max_tokens is None:
        output = price.default_max_output_tokens
        if window is not None:
            output = min(output, window - counted)
    else:
        output = max_tokens
        if window is not None and counted + output > window:
            raise InvalidRequest(
                f"max_tokens {output} plus the prompt's {counted} tokens exceed the "
                f"model's context length of {window}.",
                code="context_length_exceeded",
                param="max_tokens",
            )
    return Estimate(
        price=price,
        prompt_tokens=prompt_tokens,
        max_output_tokens=output,
        prompt_floor=fewest_tokens(count.counted),
    )


# -- admission -----------------------------------------------------------------------


def admit_request_plan(
    user: Any,
    model: str,
    *,
    messages: Any = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
    choices: int = 1,
    api_key: ApiKeyCredential | None = None,
    team: TeamPolicy | None = None,
    prompt_premium: Decimal | None = None,
    **billed: Any,
) -> Plan[tuple[Estimate, Decision]]:
    """A prompt over ``LAZY_COUNT_ABOVE`` bytes is reserved on its byte count, without
    clamping, carrying its lower bound as a probe: if the bound fits, that is the
    reservation (pessimistic, corrected at settle); if even the lower bound is refused,
    so is the request; only in between is the prompt counted and reserved again.
    ``billed``: the body's other billed fields by name, counted with the messages.
    ``api_key``, ``team``: the key the request came with and the team that pays; their
    limits are reserved with the user's. ``prompt_premium``: the most the upstream may
    charge per prompt token, in input tokens (Anthropic's cache writes); the prompt is
    reserved at it, after the context window was checked on the tokens themselves."""
    bounds = None
    if prompt_tokens is None and messages is not None:
        _check_model_name(model)
        price = yield from price_plan(model)
        bounds = bound_prompt({"messages": messages, **billed}, model)  # the estimate reuses them
        bounded = _bounded(price, bounds, max_tokens)
        if bounded is not None:
            estimate, lower = bounded
            estimate = at_premium(per_choice(estimate, choices), prompt_premium)
            decision = yield from admit_plan(
                user, estimate, probe=lower, api_key=api_key, team=team
            )
            if decision is not None:
                return estimate, decision
    estimate = yield from estimate_plan(
        model, messages=messages, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
        bounds=bounds, **billed,
    )  # fmt: skip
    estimate = at_premium(per_choice(estimate, choices), prompt_premium)
    decision = yield from admit_plan(user, estimate, api_key=api_key, team=team)
    assert decision is not None  # only a probe may leave the answer open
    return estimate, decision


class _Admission(NamedTuple):
    """A request that passed the checks needing no Redis, ready for the ledger."""

    pk: Any
    policy: UserPolicy
    estimate: Estimate
    requested: int
    clamp: bool
    minimum: int
    probe: int | None


class _Refusal(Exception):
    """Internal: a limit refused; raised to the caller with the signal sent its way."""

    def __init__(self, limit: str, retry_after: int, decision: Any = None) -> None:
        self.limit, self.retry_after, self.decision = limit, retry_after, decision


def _decided(plan: Plan[Decision | None]) -> Plan[Decision]:
    """``admit_plan`` without a probe: it never answers "count the prompt first"."""
    return cast(Plan[Decision], plan)


def admit_plan(
    user: Any,
    estimate: Estimate,
    *,
    policy: UserPolicy | None = None,
    probe: int | None = None,
    api_key: ApiKeyCredential | None = None,
    team: TeamPolicy | None = None,
) -> Plan[Decision | None]:
    """Reserve ``estimate`` or raise the refusal. With ``probe`` (a lower bound of the
    prompt, see ``admit_request_plan``) None means "count the prompt exactly". With
    ``api_key`` and ``team``, their limits are reserved in the same step as the user's."""
    pk = yield from pk_plan(user)
    if pk is None:
        raise NotAuthenticated()
    if policy is None:
        policy = yield from policy_plan(pk)
    policy = with_team(with_key(policy, api_key), team)
    if _needs_count(policy, estimate, probe):
        return None
    try:
        admission = _prepare(pk, policy, estimate, probe)
        current = yield CURRENT_LEDGER  # its clock names a blind call's periods
        decision = yield from resilient(
            lambda ledger: _reserve(ledger, admission),
            lambda _error: _unavailable(admission, current),
        )
        return _conclude(admission, decision)
    except _Refusal as refusal:
        exc = _refusal(policy, refusal)
        if getattr(refusal.decision, "burn_tripped", False):
            yield from _burn_tripped(pk, policy, exc)
        # Receivers may do I/O: async code sends it with ``asend``, off the loop.
        yield Notify(
            signals.quota_refused,
            {
                "sender": type(exc),
                "user": user,
                "limit": exc.limit,
                "retry_after": exc.retry_after,
                "error_type": exc.error_type,
                "api_key_id": policy.limits.api_key,
                "team_id": policy.limits.team,
            },  # fmt: skip
        )
        raise exc from None


def team_plan(pk: Any, api_key: ApiKeyCredential | None, named: Any) -> Plan[TeamPolicy | None]:
    """The team that pays (``rules.teams``): from memory, else the database (in a
    thread, for async). ``named``: a team's slug (the ``OpenAI-Organization`` header) or
    a ``Team``, or None."""
    key_team = api_key.team_id if api_key is not None else None
    if named is not None and not isinstance(named, str):
        named = named.slug
    found = select_team_cached(pk, key_team, named or None)
    if found is MISSING:
        found = yield Blocking(select_team, (pk, key_team, named or None))
    return found


def _burn_tripped(pk: Any, policy: UserPolicy, exc: BurnRateExceeded | Any) -> Plan[None]:
    """This reserve paused the caller: said once, loudly (a CRITICAL log line, and
    ``burn_rate_tripped``, whose receiver in ``alerts`` posts the webhook). The
    refusal's name says whose breaker it was: the user's, the API key's or the team's."""
    uid = keys.user_id(pk)
    payer: dict[str, Any] = {}
    if exc.limit.startswith("key."):
        payer["api_key_id"] = policy.limits.api_key
    elif exc.limit.startswith("team."):
        payer["team"] = policy.limits.team
    whose = "".join(f", {name} {value}" for name, value in payer.items())
    logger.critical(
        "burn-rate breaker tripped: user %s%s (tier %s) paused for %d s",
        uid, whose, policy.tier, exc.retry_after,
    )  # fmt: skip
    try:
        yield Notify(
            signals.burn_rate_tripped,
            {
                "sender": BurnRateExceeded,
                "user_id": uid,
                "tier": policy.tier,
                "paused_seconds": exc.retry_after,
                "limit": exc.limit,
                **payer,
            },
        )
    except Exception:  # a receiver's failure may never turn a 429 into a 500
        logger.exception("a burn_rate_tripped receiver failed for user %s", uid)


def pk_plan(user: Any) -> Plan[Any]:
    """The user's pk. An async view's ``request.user`` is a lazy object whose first
    touch reads the session and the user from the database: in a thread, for async."""
    # ``_wrapped`` is LazyObject's own (private, so not in the stubs).
    if isinstance(user, LazyObject) and user._wrapped is empty:  # type: ignore[attr-defined]
        return (yield Blocking(getattr, (user, "pk", None)))
    return getattr(user, "pk", user)


def _prepare(pk: Any, policy: UserPolicy, estimate: Estimate, probe: int | None) -> _Admission:
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
            raise _Refusal(policy.limits.max_tokens_per_request_name, PER_REQUEST_RETRY)
        estimate = fitted
    return _Admission(pk, policy, estimate, requested, clamp, minimum, probe)


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


def _needs_count(policy: UserPolicy, estimate: Estimate, probe: int | None) -> bool:
    """A reservation on a prompt's upper bound would be clamped by the per-request cap:
    only the exact count can say by how much."""
    cap = policy.limits.max_tokens_per_request
    return probe is not None and cap is not None and estimate.base_tokens > cap


def _reserve(ledger: Any, admission: _Admission) -> Plan[Decision]:
    """One reserve, run to its end even if the caller goes away (Redis may admit it
    whether or not anyone waits): what it admitted for a caller who left is released,
    and so is its id if no reply came at all (``reply_lost_released``).

    An upper-bound estimate is never clamped (the count might not need it); the probe
    carries the prompt's lower bound, clamped as the exact estimate would be."""
    rid = keys.reservation_id()  # ours before the call: a lost reply can still release it
    limits, estimate = admission.policy.limits, admission.estimate
    plan = ledger.ops.reserve(
        admission.pk,
        limits,
        estimate,
        clamp=admission.clamp and admission.probe is None,
        min_output_tokens=admission.minimum,
        probe_prompt_tokens=admission.probe,
        probe_clamp=admission.clamp,
        reservation_id=rid,
    )
    lost = lost_reservation(rid, admission.pk, limits, estimate)
    return (yield Shielded(reply_lost_released(plan, lost), orphan=_release_orphan))


def _release_orphan(decision: Decision) -> Plan[bool] | None:
    reservation = decision.reservation
    if reservation is None or reservation.unmetered:
        return None
    return release_plan(reservation)


def _unavailable(admission: _Admission, ledger: Any) -> Decision:
    """Redis is away: admit blind within the fallback limiter (``FAIL_OPEN``), or 503."""
    blind = outage().admit_blind(admission.pk, admission.policy.limits, admission.estimate, ledger)
    if isinstance(blind, BlindRefusal):
        raise _Refusal(blind.limit, blind.retry_after)
    return Decision(True, None, 0.0, blind, admission.requested)


def _conclude(admission: _Admission, decision: Decision) -> Decision | None:
    if not decision.allowed and admission.probe is not None:
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


def _refusal(policy: UserPolicy, refusal: _Refusal) -> RateLimited | BudgetExceeded:
    error: type[RateLimited | BudgetExceeded] = RateLimited
    if refusal.limit in BURN_RATE_LIMITS:
        error = BurnRateExceeded
    elif refusal.limit in BUDGET_LIMITS:
        error = BudgetExceeded
    # A team's limit offers the team tier's upgrade, not the member's own.
    upgrade = policy.team_upgrade if refusal.limit.startswith("team.") else policy.upgrade
    return error(refusal.limit, refusal.retry_after, upgrade=upgrade, decision=refusal.decision)


# -- settlement ----------------------------------------------------------------------


def settle_plan(
    reservation: Reservation, usage: Any, *, output_text: str | None = None
) -> Plan[Settlement]:
    """Charge ``usage`` (checked by ``usage_plan``; ``output_text`` is what the call
    generated, where known). While Redis is away the usage goes into the outage journal
    and is charged once it is back; so does the usage of a call admitted blind
    (``FAIL_OPEN``)."""
    actual = yield from usage_plan(reservation, usage, output_text)
    settlement = yield from _settle_plan(reservation, actual)
    if settlement.settled:  # not a repeated settle, nor one journaled in an outage
        yield from _overrun_plan(reservation, actual)
    return settlement


def usage_plan(reservation: Reservation, usage: Any, output_text: str | None) -> Plan[ActualUsage]:
    """The usage to charge for an upstream's report (contract §5): never 0 for a count
    that is missing, not an integer, negative, absurd (``MAX_REPORTED_TOKENS``) or
    below what the call certainly used (``fewest_tokens`` of the generated text, and
    of the prompt as the estimate counted it). The output generated, counted, stands
    in for a bad output count (the reserved output cap where the text is unknown); the
    estimate's prompt for a bad prompt count. A report that needed a stand-in is logged.
    """
    estimate = reservation.estimate
    reported = ReportedUsage.read(usage)
    checked = reported.plausible(
        input_floor=estimate.input_floor if estimate else 0,
        output_floor=fewest_tokens(byte_bound(output_text)) if output_text else 0,
    )
    if checked.complete:
        return checked.completed(0, 0)
    output = reservation.max_tokens
    if checked.output_tokens is None and output_text is not None:
        encoding = estimate.price.encoding if estimate else ""
        output = yield from count_plan(
            count_output, output_text, reservation.model, encoding_name=encoding
        )
    actual = checked.completed(estimate.prompt_tokens if estimate else 0, output)
    logger.warning(
        "upstream usage for %s (reservation %s) cannot be charged as reported (%.200r): "
        "charging %d input and %d output tokens instead",
        reservation.model, reservation.id, usage, actual.input_tokens, actual.output_tokens,
    )  # fmt: skip
    return actual


def _overrun_plan(reservation: Reservation, actual: ActualUsage) -> Plan[None]:
    """Usage above the reservation (an upstream that ignored the cap) is charged in full
    (truthful accounting beats a tidy invariant), logged, and sent as ``usage_overrun``."""
    estimate = reservation.estimate
    if reservation.unmetered or estimate is None:
        return
    charged = estimate.price.base_tokens(
        actual.input_tokens, actual.output_tokens, actual.cached_input_tokens
    )
    if charged <= reservation.reserved:
        return
    logger.warning(
        "usage of reservation %s (%s, user %s) overran it: %d base tokens charged, %d reserved",
        reservation.id, reservation.model, reservation.user_id, charged, reservation.reserved,
    )  # fmt: skip
    try:
        yield Notify(
            signals.usage_overrun,
            {
                "sender": Reservation,
                "user_id": reservation.user_id,
                "model": reservation.model,
                "reservation_id": reservation.id,
                "reserved": reservation.reserved,
                "charged": charged,
                "input_tokens": actual.input_tokens,
                "output_tokens": actual.output_tokens,
                "max_tokens": reservation.max_tokens,
            },
        )
    except Exception:  # a receiver's failure may never fail a settled call
        logger.exception("a usage_overrun receiver failed for reservation %s", reservation.id)


def _settle_plan(reservation: Reservation, actual: ActualUsage) -> Plan[Settlement]:
    state = outage()
    state.blind_call_ended(reservation)

    def journaled(error: BaseException | None) -> Settlement:
        if error is not None:
            logger.warning("could not settle reservation %s (%s): journaled", reservation.id, error)
        state.defer(reservation, actual)
        return Settlement(False, False, 0)

    settlement = yield from resilient(
        lambda ledger: _settle(ledger.ops, reservation, actual), journaled
    )
    yield from _soft_limit_alert(reservation, settlement)
    return settlement


def _settle(ops: LedgerOps, reservation: Reservation, usage: ActualUsage) -> Plan[Settlement]:
    return (yield from ops.settle(metered(reservation), usage))


def renew_plan(reservation: Reservation) -> Plan[bool | None]:
    """Extend a live call's lease (``quota.leases``): True if renewed, False once the
    reservation is no longer pending, None if Redis could not be asked (try again
    later; nothing is journaled, a lease only matters while Redis counts it)."""
    if reservation.unmetered:
        return False
    return (yield from resilient(lambda ledger: ledger.ops.renew(reservation), lambda _e: None))


def release_plan(reservation: Reservation) -> Plan[bool]:
    """While Redis is away the release is journaled; were it lost, the reservation
    would still expire after ``RESERVATION_TTL``."""
    state = outage()
    if reservation.unmetered:
        state.blind_call_ended(reservation)
        return False

    def journaled(error: BaseException | None) -> bool:
        if error is not None:
            logger.warning(
                "could not release reservation %s (%s): journaled", reservation.id, error
            )
        state.defer(reservation, None)
        return False

    return (yield from resilient(lambda ledger: ledger.ops.release(reservation), journaled))


def _soft_limit_alert(reservation: Reservation, settlement: Settlement) -> Plan[None]:
    """``alerts.after_settle`` only for the settle that crosses the soft limit: the
    crossing is read from the settle's reply, so the others cost nothing."""
    if not settlement.settled or settlement.month_used is None:
        return
    try:
        policy = yield from policy_plan(alerts.user_pk(reservation.user_id))
        user_crossed = alerts.soft_limit_crossing(policy, settlement) is not None
        team = config_cache.peek(("team", int(reservation.team))) if reservation.team else None
        team_crossed = settlement.team_month_used is not None and (
            team is MISSING or alerts.team_soft_limit_crossing(team, settlement) is not None
        )
    except Exception:  # an alert may never fail a request
        logger.exception("soft-limit alert failed for user %s", reservation.user_id)
        return
    if not user_crossed and not team_crossed:
        return
    ledger = yield USE_LEDGER
    # The marker is set with the sync client; receivers may write to the database:
    # thread-sensitive, as Django asks of ORM code.
    sync_ledger = ledger if isinstance(ledger, Ledger) else ledger.mirrors
    if user_crossed:
        yield Blocking(alerts.after_settle, (reservation, settlement, sync_ledger))
    if team_crossed:
        yield Blocking(alerts.after_team_settle, (reservation, settlement, sync_ledger))


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
