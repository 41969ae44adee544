"""``quota_guard``: reserve before an LLM call, settle after it.

For views, Celery tasks and scripts that call an LLM themselves:

```python
with quota_guard(request.user, model="gpt-4o", messages=msgs, max_tokens=500) as quota:
    reply = client.chat.completions.create(
        model="gpt-4o", messages=msgs, max_tokens=quota.max_tokens)
    quota.settle(reply.usage)
```

``quota.max_tokens`` may be lower than asked (``CLAMP_MAX_TOKENS``): send it, so the
output can never exceed what was reserved. ``async with`` works the same way
(``await quota.asettle(usage)``, ``arelease()``, ``asettle_output()``,
``acharge_estimate()``), on the ``AsyncLedger``: no thread is held while Redis
answers, and the ORM is read in a thread only when the tier or price is not cached.

Leaving the block unsettled charges the estimate: a billed call must never cost
nothing. An exception does too, unless it shows that the upstream billed nothing
(``release_rule``: the provider's error answer, a connection never made, a refusal);
call ``quota.release()`` yourself where you know the call was never made.

The guard is also the ticket the adapters hang on a request (``request.llm_quota``):
``admit()`` reserves, and exactly one of ``settle()``, ``settle_output()``,
``release()``, ``charge_estimate()`` or ``fail(exc)`` finishes it. Each is one plan,
run by the sync driver or, for the ``a``-prefixed twin, by the async one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from types import TracebackType
from typing import Any

from llm_quota.conf import quota_settings
from llm_quota.exceptions import InvalidRequest
from llm_quota.ledger.async_driver import AsyncLedger, twin_of
from llm_quota.ledger.plans import Plan
from llm_quota.ledger.replies import Decision, Reservation, Settlement
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import admission, leases
from llm_quota.quota.access import tier_access_plan
from llm_quota.quota.drivers import arun, run
from llm_quota.quota.release_rule import unbilled_error
from llm_quota.rules.accounting import ActualUsage, Estimate
from llm_quota.rules.api_keys import ApiKeyCredential
from llm_quota.rules.estimation import count_output
from llm_quota.rules.teams import TeamPolicy

logger = logging.getLogger("llm_quota")


class QuotaGuard:
    def __init__(
        self,
        user: Any,
        *,
        model: str,
        messages: Any = None,
        prompt_tokens: int | None = None,
        max_tokens: int | None = None,
        choices: int = 1,
        scope: str | None = None,
        api_key: ApiKeyCredential | None = None,
        team: Any = None,
        prompt_premium: Decimal | None = None,
        ledger: Ledger | None = None,
        aledger: AsyncLedger | None = None,
        **billed: Any,
    ) -> None:
        self.user = user
        self.model = model
        self.messages = messages
        self.prompt_tokens = prompt_tokens
        self.requested_max_tokens = max_tokens
        #: The body's other billed fields by name (``tools``, ``functions``,
        #: ``response_format``...: ``shapes.chat.BILLED_FIELDS`` for a chat body), counted
        #: with the messages. The guard keeps no list of its own.
        self.billed = billed
        # ``n`` completions of one prompt: the output cap is reserved once per choice.
        self.choices = max(1, int(choices))
        #: The scope the user's tier must grant: ``None`` reads ``CHAT_SCOPE``; an
        #: adapter that checked another scope itself (the throttle's) passes that one.
        self.scope = quota_settings.CHAT_SCOPE if scope is None else scope
        #: The API key the call is made with (``request.auth`` of a key caller): its
        #: scopes narrow the tier's, its limits are reserved with the user's.
        self.api_key = api_key
        #: The team named to pay (a slug, or a ``Team``); else the key's, else the user's
        #: only team (``rules.teams``). Resolved at admission into ``team_policy``.
        self.team = team
        self.team_policy: TeamPolicy | None = None
        #: The most the upstream may bill per prompt token, in input tokens (Anthropic's
        #: cache writes, ``shapes.messages.cache_write_premium``); None: the token itself.
        self.prompt_premium = prompt_premium
        self.ledger = ledger
        # Given a sync ledger only, ``async with`` uses its twin (same Redis and clock).
        self.aledger = aledger
        self.decision: Decision | None = None
        self.settlement: Settlement | None = None
        self._finished = False
        #: The admitted request's rate-limit headers (``throttling.admission_headers``).
        self.headers: Mapping[str, str] | None = None

    @property
    def tools(self) -> Any:
        return self.billed.get("tools")

    @property
    def prompt(self) -> dict[str, Any]:
        """Every billed field of the prompt, by name: what the estimate counts."""
        return {"messages": self.messages, **self.billed}

    @property
    def reservation(self) -> Reservation:
        if self.decision is None or self.decision.reservation is None:
            raise RuntimeError("the guard has not been entered")
        return self.decision.reservation

    @property
    def max_tokens(self) -> int:
        """The output cap to send upstream (per choice): what was reserved, perhaps clamped."""
        return self.reservation.max_tokens // self.choices

    @property
    def estimate(self) -> Estimate:
        estimate = self.reservation.estimate
        if estimate is None:  # pragma: no cover - reservations are built by reserve()
            raise RuntimeError("the reservation carries no estimate")
        return estimate

    @property
    def finished(self) -> bool:
        """Settled, released or charged: nothing of it is reserved any more."""
        return self._finished

    # -- what happens, written once --------------------------------------------------

    def _estimate_args(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.requested_max_tokens,
            "choices": self.choices,
            "prompt_premium": self.prompt_premium,
            **self.billed,
        }

    def admit_plan(self) -> Plan[QuotaGuard]:
        """``admit`` as a plan, for adapters that admit as part of a larger plan."""
        # A blocked user, or a tier without the scope, is refused like on every other
        # path, before anything is priced or sent to Redis.
        yield from tier_access_plan(self.user, self.scope, self.api_key)
        pk = yield from admission.pk_plan(self.user)
        self.team_policy = yield from admission.team_plan(pk, self.api_key, self.team)
        _estimate, self.decision = yield from admission.admit_request_plan(
            self.user, self.model, api_key=self.api_key, team=self.team_policy,
            **self._estimate_args(),
        )  # fmt: skip
        if self.max_tokens < 1 and self.requested_max_tokens != 0:
            # Clamped below one token per choice: nothing useful could be sent (a call
            # that asked for no output, embeddings, needs none).
            yield from self._release_plan()
            raise InvalidRequest(
                f"{self.choices} completions do not fit in the remaining quota; ask for fewer.",
                param="n",
            )
        # Renewed while the call runs longer than a third of RESERVATION_TTL; every way
        # the guard finishes (_settle_plan, _release_plan) drops it.
        leases.keeper().hold(self, self.reservation, self.ledger, self.aledger)
        return self

    def _settle_plan(self, usage: Any, output_text: str | None = None) -> Plan[Settlement]:
        if self._finished:  # settled already, or released: nothing more to charge
            return self.settlement or Settlement(False, False, 0)
        leases.keeper().drop(self)
        self.settlement = yield from admission.settle_plan(
            self.reservation, usage, output_text=output_text
        )
        self._finished = True
        return self.settlement

    def _settle_output_plan(self, text: str, prompt_tokens: int | None) -> Plan[Settlement]:
        """Count the generated text in the estimate's encoding; the prompt as counted
        for the estimate (a huge prompt admitted on its byte bound is counted now, since
        it is to be charged, not just bounded)."""
        output = yield from admission.count_plan(
            count_output, text, self.model, encoding_name=self.estimate.price.encoding
        )
        if prompt_tokens is None:
            prompt_tokens = yield from self._prompt_tokens_plan()
        return (yield from self._settle_plan(ActualUsage(prompt_tokens, output)))

    def _prompt_tokens_plan(self) -> Plan[int]:
        estimate = self.estimate
        if estimate.prompt_exact:
            return estimate.prompt_tokens
        return (yield from admission.prompt_count_plan(self.model, self.prompt, estimate.price))

    def _release_plan(self) -> Plan[bool]:
        if self._finished:
            return False
        leases.keeper().drop(self)
        released = yield from admission.release_plan(self.reservation)
        # Only now: a release that raised (or was cancelled) leaves the guard unfinished,
        # so its adapter still ends it (a settle after a release changes nothing).
        self._finished = True
        return released

    def _charge_estimate_plan(self, why: str = "finished without usage") -> Plan[Settlement]:
        logger.warning("LLM call to %s %s; charging the estimate", self.model, why)
        prompt = yield from self._prompt_tokens_plan()
        return (yield from self._settle_plan(ActualUsage(prompt, self.reservation.max_tokens)))

    def _fail_plan(self, exc: BaseException) -> Plan[None]:
        """Released where ``exc`` proves nothing was billed, else charged the estimate."""
        if self._finished or self.decision is None:
            return
        if unbilled_error(exc):
            yield from self._release_plan()
        else:
            why = f"failed ({type(exc).__name__}) without proof that nothing was billed"
            yield from self._charge_estimate_plan(why)

    def _exit_plan(self, exc: BaseException | None) -> Plan[None]:
        if self._finished or self.decision is None:
            return
        if exc is not None:
            yield from self._fail_plan(exc)
        else:
            # No usage reported: charge the estimate rather than lose a call that ran.
            yield from self._charge_estimate_plan()

    # -- sync --------------------------------------------------------------------------

    def admit(self) -> QuotaGuard:
        """Price the call and reserve it, or raise the refusal."""
        return run(self.admit_plan(), self.ledger)

    def settle(self, usage: Any, *, output_text: str | None = None) -> Settlement:
        """Charge what the call really used (an OpenAI ``usage``, dict or ActualUsage).

        A count the upstream got wrong is not charged as reported: the generated
        ``output_text``, counted, stands in for the output (the reserved cap where it is
        not given), the estimate's prompt for the prompt (``admission.usage_plan``)."""
        return run(self._settle_plan(usage, output_text), self.ledger)

    def settle_output(self, text: str, *, prompt_tokens: int | None = None) -> Settlement:
        """Settle a call whose upstream reported no usage: count the text it generated."""
        return run(self._settle_output_plan(text, prompt_tokens), self.ledger)

    def release(self) -> bool:
        """Give everything back: the call failed before using tokens."""
        return run(self._release_plan(), self.ledger)

    def charge_estimate(self) -> Settlement:
        """A call ran but reported nothing: charge what was reserved rather than lose it."""
        return run(self._charge_estimate_plan(), self.ledger)

    def fail(self, exc: BaseException) -> None:
        """End a call that raised ``exc`` by the release rule (``release_rule``):
        released if ``exc`` proves the upstream billed nothing, else charged the estimate."""
        run(self._fail_plan(exc), self.ledger)

    def __enter__(self) -> QuotaGuard:
        return self.admit()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run(self._exit_plan(exc), self.ledger)

    # -- async -------------------------------------------------------------------------

    def _async_ledger(self) -> AsyncLedger | None:
        # Given a sync ledger only, ``async with`` uses its twin (same Redis and clock).
        if self.aledger is None and self.ledger is not None:
            self.aledger = twin_of(self.ledger)
        return self.aledger

    async def aadmit(self) -> QuotaGuard:
        return await arun(self.admit_plan(), self._async_ledger())

    async def asettle(self, usage: Any, *, output_text: str | None = None) -> Settlement:
        return await arun(self._settle_plan(usage, output_text), self._async_ledger())

    async def asettle_output(self, text: str, *, prompt_tokens: int | None = None) -> Settlement:
        return await arun(self._settle_output_plan(text, prompt_tokens), self._async_ledger())

    async def arelease(self) -> bool:
        return await arun(self._release_plan(), self._async_ledger())

    async def acharge_estimate(self) -> Settlement:
        return await arun(self._charge_estimate_plan(), self._async_ledger())

    async def afail(self, exc: BaseException) -> None:
        await arun(self._fail_plan(exc), self._async_ledger())

    async def __aenter__(self) -> QuotaGuard:
        return await self.aadmit()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await arun(self._exit_plan(exc), self._async_ledger())


def quota_guard(user: Any, *, model: str, **kwargs: Any) -> QuotaGuard:
    """Reserve for ``user``'s call to ``model``; see the module docstring."""
    return QuotaGuard(user, model=model, **kwargs)
