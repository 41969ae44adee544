"""``spend``: one call admitted and settled at its real usage, the usage other tests read."""

from __future__ import annotations

from typing import Any

from llm_quota.rules.accounting import ActualUsage, Estimate, Limits, Price, to_micro


def spend(
    user: Any,
    prompt: int = 100,
    completion: int = 50,
    *,
    model: str = "gpt-4o",
    max_tokens: int = 100,
    ledger: Any = None,
    multipliers: tuple[str | int, str | int] = (1, 4),
) -> Any:
    """Returns the settlement. Without ``ledger``: through ``quota_guard``, as a view
    would, so the user's tier, the price rows and the alerts all take part. With a
    ``ledger``: straight on it, with no limits, at ``multipliers`` (input, output), so
    no database row is needed; ``user`` may then be a bare id (as in spawned workers).
    """
    if ledger is None:
        from llm_quota import quota_guard  # imports Django models: not in spawned workers

        with quota_guard(user, model=model, prompt_tokens=prompt, max_tokens=max_tokens) as q:
            return q.settle({"prompt_tokens": prompt, "completion_tokens": completion})
    price = Price(model, to_micro(multipliers[0]), to_micro(multipliers[1]))
    estimate = Estimate(price, prompt, completion)
    decision = ledger.reserve(getattr(user, "pk", user), Limits(), estimate)
    assert decision.allowed, decision
    return ledger.settle(decision.reservation, ActualUsage(prompt, completion))
