"""``quota_guard``: reserve before an LLM call, settle after it, release on failure.

For views, Celery tasks and scripts that call an LLM themselves::

    with quota_guard(request.user, model="gpt-4o", messages=msgs, max_tokens=500) as quota:
        reply = client.chat.completions.create(
            model="gpt-4o", messages=msgs, max_tokens=quota.max_tokens)
        quota.settle(reply.usage)

``quota.max_tokens`` may be lower than asked (``CLAMP_MAX_TOKENS``): send it, so the
output can never exceed what was reserved. ``async with`` works the same way
(``await quota.asettle(usage)``, ``arelease()``, ``asettle_output()``,
``acharge_estimate()``), on the ``AsyncLedger``: no thread is held while Redis
answers, and the ORM is read in a thread only when the tier or price is not cached.

The guard is also the ticket the DRF throttle and the middleware hang on a request
(``request.llm_quota``): ``admit()`` reserves, and exactly one of ``settle()``,
``settle_output()``, ``release()`` or ``charge_estimate()`` finishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from asgiref.sync import sync_to_async

from llm_quota.exceptions import InvalidRequest
from llm_quota.ledger.async_driver import AsyncLedger, twin_of
from llm_quota.ledger.replies import Decision, Reservation, Settlement
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import admission as gate
from llm_quota.rules.accounting import ActualUsage, Estimate
from llm_quota.rules.estimation import count_messages, count_output, counts_quickly

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
        tools: Any = None,
        choices: int = 1,
        ledger: Ledger | None = None,
        aledger: AsyncLedger | None = None,
    ) -> None:
        self.user = user
        self.model = model
        self.messages = messages
        self.prompt_tokens = prompt_tokens
        self.requested_max_tokens = max_tokens
        self.tools = tools
        # ``n`` completions of one prompt: the output cap is reserved once per choice.
        self.choices = max(1, int(choices))
        self.ledger = ledger
        # Given a sync ledger only, ``async with`` uses its twin (same Redis and clock).
        self.aledger = aledger
        self.decision: Decision | None = None
        self.settlement: Settlement | None = None
        self._finished = False
        #: The admitted request's rate-limit headers (``throttling.admission_headers``).
        self.headers: Mapping[str, str] | None = None

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

    # -- sync ----------------------------------------------------------------------

    def _estimate_args(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.requested_max_tokens,
            "tools": self.tools,
        }

    def _too_many_choices(self) -> InvalidRequest | None:
        """Clamped below one token per choice: nothing useful could be sent."""
        if self.max_tokens >= 1:
            return None
        return InvalidRequest(
            f"{self.choices} completions do not fit in the remaining quota; ask for fewer.",
            param="n",
        )

    def admit(self) -> QuotaGuard:
        """Price the call and reserve it, or raise the refusal (``gate.admit``)."""
        _estimate, self.decision = gate.admit_request(
            self.user, self.model, choices=self.choices, ledger=self.ledger, **self._estimate_args()
        )
        refusal = self._too_many_choices()
        if refusal is not None:
            self.release()
            raise refusal
        return self

    def __enter__(self) -> QuotaGuard:
        return self.admit()

    def settle(self, usage: Any) -> Settlement:
        """Charge what the call really used (an OpenAI ``usage``, dict or ActualUsage)."""
        if self._finished and self.settlement is not None:
            return self.settlement
        self.settlement = gate.settle(self.reservation, usage, ledger=self.ledger)
        self._finished = True
        return self.settlement

    def settle_output(self, text: str, *, prompt_tokens: int | None = None) -> Settlement:
        """Settle a call whose upstream reported no usage: count the text it generated.

        The prompt is charged as counted for the estimate (the same encoding), the
        output as ``estimation.count_output`` counts ``text``.
        """
        output = count_output(text, self.model, encoding_name=self.estimate.price.encoding)
        return self.settle(self._counted_usage(output, prompt_tokens))

    def _counted_usage(self, output: int, prompt_tokens: int | None) -> ActualUsage:
        prompt = self._prompt_tokens() if prompt_tokens is None else prompt_tokens
        return ActualUsage(prompt, output)

    def _prompt_tokens(self) -> int:
        """The prompt as counted for the estimate; a huge prompt admitted on its byte
        bound is counted now, since it is to be charged, not just bounded."""
        estimate = self.estimate
        if estimate.prompt_exact:
            return estimate.prompt_tokens
        return count_messages(
            self.messages, self.model, encoding_name=estimate.price.encoding, tools=self.tools
        )

    async def _aprompt_tokens(self) -> int:
        if self.estimate.prompt_exact:
            return self.estimate.prompt_tokens
        return await sync_to_async(self._prompt_tokens, thread_sensitive=False)()

    def release(self) -> bool:
        """Give everything back: the call failed before using tokens."""
        if self._finished:
            return False
        self._finished = True
        return gate.release(self.reservation, ledger=self.ledger)

    def charge_estimate(self) -> Settlement:
        """A call ran but reported nothing: charge what was reserved rather than lose it."""
        return self.settle(self._estimate_as_usage())

    def _estimate_as_usage(self, prompt_tokens: int | None = None) -> ActualUsage:
        logger.warning("LLM call to %s finished without usage; charging the estimate", self.model)
        prompt = self._prompt_tokens() if prompt_tokens is None else prompt_tokens
        return ActualUsage(prompt, self.reservation.max_tokens)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._finished or self.decision is None:
            return
        if exc_type is not None:
            self.release()
            return
        # No usage reported: charge the estimate rather than lose a call that ran.
        self.charge_estimate()

    # -- async ---------------------------------------------------------------------

    def _async_ledger(self) -> AsyncLedger | None:
        if self.aledger is None and self.ledger is not None:
            self.aledger = twin_of(self.ledger)
        return self.aledger

    async def aadmit(self) -> QuotaGuard:
        """``admit`` for async code (``gate.aadmit_request``)."""
        _estimate, self.decision = await gate.aadmit_request(
            self.user,
            self.model,
            choices=self.choices,
            ledger=self._async_ledger(),
            **self._estimate_args(),
        )
        refusal = self._too_many_choices()
        if refusal is not None:
            await self.arelease()
            raise refusal
        return self

    async def __aenter__(self) -> QuotaGuard:
        return await self.aadmit()

    async def asettle(self, usage: Any) -> Settlement:
        if self._finished and self.settlement is not None:
            return self.settlement
        self.settlement = await gate.asettle(self.reservation, usage, ledger=self._async_ledger())
        self._finished = True
        return self.settlement

    async def asettle_output(self, text: str, *, prompt_tokens: int | None = None) -> Settlement:
        """``settle_output`` for async code: a long text is counted in a thread."""
        encoding = self.estimate.price.encoding
        if counts_quickly(text, self.model, encoding_name=encoding):
            output = count_output(text, self.model, encoding_name=encoding)
        else:
            output = await sync_to_async(count_output, thread_sensitive=False)(
                text, self.model, encoding_name=encoding
            )
        if prompt_tokens is None:
            prompt_tokens = await self._aprompt_tokens()
        return await self.asettle(self._counted_usage(output, prompt_tokens))

    async def arelease(self) -> bool:
        if self._finished:
            return False
        self._finished = True
        return await gate.arelease(self.reservation, ledger=self._async_ledger())

    async def acharge_estimate(self) -> Settlement:
        return await self.asettle(self._estimate_as_usage(await self._aprompt_tokens()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._finished or self.decision is None:
            return
        if exc_type is not None:
            await self.arelease()
            return
        await self.acharge_estimate()


def quota_guard(user: Any, *, model: str, **kwargs: Any) -> QuotaGuard:
    """Reserve for ``user``'s call to ``model``; see the module docstring."""
    return QuotaGuard(user, model=model, **kwargs)
