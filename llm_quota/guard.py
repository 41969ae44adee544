"""``quota_guard``: reserve before an LLM call, settle after it, release on failure.

For views, Celery tasks and scripts that call an LLM themselves::

    with quota_guard(request.user, model="gpt-4o", messages=msgs, max_tokens=500) as quota:
        reply = client.chat.completions.create(
            model="gpt-4o", messages=msgs, max_tokens=quota.max_tokens)
        quota.settle(reply.usage)

``quota.max_tokens`` may be lower than asked (``CLAMP_MAX_TOKENS``): send it, so the
output can never exceed what was reserved. ``async with`` works the same way.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from asgiref.sync import sync_to_async

from llm_quota import gate
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
    ) -> None:
        self.user = user
        self.model = model
        self.messages = messages
        self.prompt_tokens = prompt_tokens
        self.requested_max_tokens = max_tokens
        self.tools = tools
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
        # No usage reported: charge the estimate rather than lose a call that ran.
        logger.warning(
            "quota_guard for %s left without settle(); charging the estimate", self.model
        )
        estimate = self.reservation.estimate
        self.settle(
            {"prompt_tokens": estimate.prompt_tokens if estimate else 0,
             "completion_tokens": self.max_tokens}
        )  # fmt: skip

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
