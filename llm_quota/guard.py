"""``quota_guard``: reserve before an LLM call, settle after it, release on failure.

For views, Celery tasks and scripts that call an LLM themselves::

    with quota_guard(request.user, model="gpt-4o", messages=msgs, max_tokens=500) as quota:
        reply = client.chat.completions.create(
            model="gpt-4o", messages=msgs, max_tokens=quota.max_tokens)
        quota.settle(reply.usage)

``quota.max_tokens`` may be lower than asked (``CLAMP_MAX_TOKENS``): send it, so the
output can never exceed what was reserved. ``async with`` works the same way
(``await quota.asettle(usage)``), on the ``AsyncLedger``: no thread is held while
Redis answers, and the ORM is read in a thread only when the tier or price is not
cached.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from llm_quota import gate
from llm_quota.async_ledger import AsyncLedger, twin_of
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
        ledger: Ledger | None = None,
        aledger: AsyncLedger | None = None,
    ) -> None:
        self.user = user
        self.model = model
        self.messages = messages
        self.prompt_tokens = prompt_tokens
        self.requested_max_tokens = max_tokens
        self.tools = tools
        self.ledger = ledger
        # Given a sync ledger only, ``async with`` uses its twin (same Redis and clock).
        self.aledger = aledger
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
        """The output cap to send upstream: what was reserved, perhaps clamped."""
        return self.reservation.max_tokens

    # -- sync ----------------------------------------------------------------------

    def __enter__(self) -> QuotaGuard:
        estimate = gate.estimate_request(
            self.model,
            messages=self.messages,
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.requested_max_tokens,
            tools=self.tools,
        )
        self.decision = gate.admit(self.user, estimate, ledger=self.ledger)
        return self

    def settle(self, usage: Any) -> Settlement:
        """Charge what the call really used (an OpenAI ``usage``, dict or ActualUsage)."""
        self.settlement = gate.settle(self.reservation, usage, ledger=self.ledger)
        self._finished = True
        return self.settlement

    def release(self) -> bool:
        """Give everything back: the call failed before using tokens."""
        self._finished = True
        return gate.release(self.reservation, ledger=self.ledger)

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
        self.settle(self._estimate_as_usage())

    def _estimate_as_usage(self) -> dict[str, int]:
        """No usage reported: charge the estimate rather than lose a call that ran."""
        logger.warning(
            "quota_guard for %s left without settle(); charging the estimate", self.model
        )
        estimate = self.reservation.estimate
        return {
            "prompt_tokens": estimate.prompt_tokens if estimate else 0,
            "completion_tokens": self.max_tokens,
        }

    # -- async ---------------------------------------------------------------------

    def _async_ledger(self) -> AsyncLedger | None:
        if self.aledger is None and self.ledger is not None:
            self.aledger = twin_of(self.ledger)
        return self.aledger

    async def __aenter__(self) -> QuotaGuard:
        estimate = await gate.aestimate_request(
            self.model,
            messages=self.messages,
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.requested_max_tokens,
            tools=self.tools,
        )
        self.decision = await gate.aadmit(self.user, estimate, ledger=self._async_ledger())
        return self

    async def asettle(self, usage: Any) -> Settlement:
        self.settlement = await gate.asettle(self.reservation, usage, ledger=self._async_ledger())
        self._finished = True
        return self.settlement

    async def arelease(self) -> bool:
        self._finished = True
        return await gate.arelease(self.reservation, ledger=self._async_ledger())

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
        await self.asettle(self._estimate_as_usage())


def quota_guard(user: Any, *, model: str, **kwargs: Any) -> QuotaGuard:
    """Reserve for ``user``'s call to ``model``; see the module docstring."""
    return QuotaGuard(user, model=model, **kwargs)
