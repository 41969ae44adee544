"""``quota_guard``: reserve before an LLM call, settle after it, release on failure.

For views, Celery tasks and scripts that call an LLM themselves::

    with quota_guard(request.user, model="gpt-4o", messages=msgs, max_tokens=500) as quota:
        reply = client.chat.completions.create(
            model="gpt-4o", messages=msgs, max_tokens=quota.max_tokens)
        quota.settle(reply.usage)

``quota.max_tokens`` may be lower than asked (``CLAMP_MAX_TOKENS``): send it, so the
output can never exceed what was reserved. ``async with`` works the same way.

The guard is also the ticket the DRF throttle and the middleware hang on a request
(``request.llm_quota``): ``admit()`` reserves, and exactly one of ``settle()``,
``settle_output()``, ``release()`` or ``charge_estimate()`` finishes it.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from asgiref.sync import sync_to_async

from llm_quota import gate
from llm_quota.accounting import ActualUsage, Estimate
from llm_quota.estimation import count_output
from llm_quota.exceptions import InvalidRequest
from llm_quota.redis_ledger import Decision, Ledger, Reservation, Settlement

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
        self.decision: Decision | None = None
        self.settlement: Settlement | None = None
        self._finished = False

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

    def admit(self) -> QuotaGuard:
        """Price the call and reserve it, or raise the refusal (``gate.admit``)."""
        estimate = gate.estimate_request(
            self.model,
            messages=self.messages,
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.requested_max_tokens,
            tools=self.tools,
        )
        if self.choices > 1:
            estimate = Estimate(
                estimate.price, estimate.prompt_tokens, estimate.max_output_tokens * self.choices
            )
        self.decision = gate.admit(self.user, estimate, ledger=self.ledger)
        if self.max_tokens < 1:
            # Clamped below one token per choice: nothing useful could be sent.
            self.release()
            raise InvalidRequest(
                f"{self.choices} completions do not fit in the remaining quota; ask for fewer.",
                param="n",
            )
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
        estimate = self.estimate
        output = count_output(text, self.model, encoding_name=estimate.price.encoding)
        prompt = estimate.prompt_tokens if prompt_tokens is None else prompt_tokens
        return self.settle(ActualUsage(prompt, output))

    def release(self) -> bool:
        """Give everything back: the call failed before using tokens."""
        if self._finished:
            return False
        self._finished = True
        return gate.release(self.reservation, ledger=self.ledger)

    def charge_estimate(self) -> Settlement:
        """A call ran but reported nothing: charge what was reserved rather than lose it."""
        logger.warning("LLM call to %s finished without usage; charging the estimate", self.model)
        return self.settle(ActualUsage(self.estimate.prompt_tokens, self.reservation.max_tokens))

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

    async def __aenter__(self) -> QuotaGuard:
        # The ORM (tier, prices) is sync-only; one hop to the thread Django keeps for
        # sync work, whose connection ASGI closes at the end of the request.
        return await sync_to_async(self.__enter__)()

    async def asettle(self, usage: Any) -> Settlement:
        return await sync_to_async(self.settle)(usage)

    async def arelease(self) -> bool:
        return await sync_to_async(self.release)()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await sync_to_async(self.__exit__)(exc_type, exc, tb)


def quota_guard(user: Any, *, model: str, **kwargs: Any) -> QuotaGuard:
    """Reserve for ``user``'s call to ``model``; see the module docstring."""
    return QuotaGuard(user, model=model, **kwargs)
