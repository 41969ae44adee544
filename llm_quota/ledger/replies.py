"""What the ledger hands back: reservations, decisions, settlements, usage figures.

Plain frozen values, shared by the sync and the async ledger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from llm_quota.rules.accounting import Estimate

#: Limits whose refusal a retry within the period cannot cure (OpenAI: insufficient_quota).
BUDGET_LIMITS = frozenset(
    {
        "tokens_per_day",
        "tokens_per_month",
        "global_tokens_per_day",
        "global_tokens_per_month",
        "max_tokens_per_request",
        "key.tokens_per_day",
        "key.tokens_per_month",
        "team.tokens_per_day",
        "team.tokens_per_month",
        "burn_rate_exceeded",
        "key.burn_rate_exceeded",
        "team.burn_rate_exceeded",
        "team.max_tokens_per_request",
    }
)

#: The burn-rate breaker's refusal: the caller spends far faster than its baseline.
BURN_RATE_LIMIT = "burn_rate_exceeded"
#: The same refusal for each payer: the user's, an API key's, a team's.
BURN_RATE_LIMITS = frozenset({BURN_RATE_LIMIT, "key." + BURN_RATE_LIMIT, "team." + BURN_RATE_LIMIT})


@dataclass(frozen=True)
class Reservation:
    """A held estimate. Hand it to ``settle`` or ``release``; both are idempotent."""

    id: str
    user_id: str
    model: str
    reserved: int
    max_tokens: int
    estimate: Estimate | None
    day: str
    month: str
    month_end_ms: int
    uses_global: bool
    #: Admitted without Redis (fail-open): settling it records nothing here.
    unmetered: bool = False
    #: The API key that also holds a share of it (its id), or None.
    api_key: str | None = None
    #: The team that also holds a share of it (its id), or None.
    team: str | None = None


@dataclass(frozen=True)
class Decision:
    """What ``reserve`` decided, with the figures the HTTP headers report."""

    allowed: bool
    limit: str | None
    retry_after: float
    reservation: Reservation | None
    requested_max_tokens: int
    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset: float = 0.0
    #: The token limit with the least remaining (minute, day or month), and the length
    #: of its window or period in seconds.
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset: float = 0.0
    tokens_window: float = 60.0
    #: A refused reserve that carried a probe (a lower bound of the prompt): the limit
    #: that would refuse the lower bound too, and when it clears; None if none would.
    probe_limit: str | None = None
    probe_retry_after: float = 0.0
    #: This very reserve tripped the burn-rate breaker (the refusal is the pause, unless
    #: a longer limit refused as well): the caller reports the trip, once.
    burn_tripped: bool = False

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds, rounded up and never 0 (``Retry-After: 0`` invites a hammering)."""
        return max(1, math.ceil(self.retry_after))

    @property
    def is_budget(self) -> bool:
        return self.limit in BUDGET_LIMITS

    @property
    def max_tokens(self) -> int:
        return self.reservation.max_tokens if self.reservation else 0

    @property
    def clamped(self) -> bool:
        return self.reservation is not None and self.max_tokens < self.requested_max_tokens


@dataclass(frozen=True)
class BurnState:
    """A payer's burn-rate breaker as Redis holds it (``burn_state.lua``)."""

    #: When the pause ends (ms since the epoch), None if not paused.
    paused_until_ms: int | None
    #: The baseline: the decaying peak of one-minute spends, in base tokens a minute.
    baseline_per_minute: int
    #: The base tokens of the sliding minute, as last kept (settled and in flight).
    last_minute: int
    now_ms: int

    @property
    def paused(self) -> bool:
        return self.paused_until_ms is not None


@dataclass(frozen=True)
class Settlement:
    settled: bool
    late: bool
    charged_delta: int
    #: The reservation's month and its settled base tokens after this settle (None
    #: when nothing was settled): what the soft-limit alert compares, at no extra cost.
    month: str = ""
    month_used: int | None = None
    #: Base tokens this settle charged for the request.
    base_tokens: int = 0
    #: The paying team's month settled after this one (None: no team, or unchanged).
    team_month_used: int | None = None


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    base_tokens: int = 0


@dataclass(frozen=True)
class PeriodUsage:
    """Base tokens used and reserved in the current calendar day and month."""

    day: str
    month: str
    day_end_ms: int
    month_end_ms: int
    tokens_today: int
    tokens_this_month: int


@dataclass(frozen=True)
class UserUsage(PeriodUsage):
    """A user's live counters, as the next decision would see them."""

    reserved: int
    requests_this_minute: int
    tokens_this_minute: int
    in_flight: int
    by_model: list[ModelUsage] = field(default_factory=list)

    @property
    def settled_this_month(self) -> int:
        """Base tokens settled this month (``tokens_this_month`` less what is reserved)."""
        return sum(row.base_tokens for row in self.by_model)


@dataclass(frozen=True)
class KeyUsage(PeriodUsage):
    """An API key's live counters (settled plus reserved in the periods) and its
    settled figures of the month."""

    reserved: int
    requests_this_minute: int
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    base_tokens: int = 0


@dataclass(frozen=True)
class MemberUsage:
    user_id: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    base_tokens: int = 0


@dataclass(frozen=True)
class TeamUsage(PeriodUsage):
    """A team's live counters and its settled month, by member and by model."""

    reserved: int
    requests_this_minute: int
    in_flight: int
    by_member: list[MemberUsage] = field(default_factory=list)
    by_model: list[ModelUsage] = field(default_factory=list)


@dataclass(frozen=True)
class TeamMonth:
    """A team's month as the database last saw it (``TeamUsageSnapshot``): what comes
    back into Redis after a loss."""

    total: ModelUsage
    by_member: list[MemberUsage] = field(default_factory=list)
    by_model: list[ModelUsage] = field(default_factory=list)
    #: The month's latest day the snapshot copied (``YYYYMMDD``, ``""``: none) and that
    #: day's counter: it comes back too if it is still today.
    day: str = ""
    day_base_tokens: int = 0


@dataclass(frozen=True)
class KeyMonth:
    """An API key's month as the database last saw it (``ApiKeyUsageSnapshot``), with its
    latest copied day as ``TeamMonth`` has it: what comes back into Redis after a loss."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    base_tokens: int = 0
    day: str = ""
    day_base_tokens: int = 0


@dataclass(frozen=True)
class PeriodReset:
    """What ``reset_period`` did: the month counter before and what stays in flight."""

    day: str
    month: str
    tokens_before: int
    tokens_after: int
    #: The user's new generation (``reset.lua``): what the next snapshot copies.
    generation: int = 0


@dataclass(frozen=True)
class GlobalUsage(PeriodUsage):
    """Everyone's usage against the global caps (settled plus still reserved)."""

    in_flight: int


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: A per-model hash field's kind -> its position in ``ModelUsage`` after the model
#: (bytes from a plain client, str from one that decodes responses).
_FIELD_KINDS: dict[Any, int] = {"req": 0, "in": 1, "out": 2, "base": 3}
_FIELD_KINDS.update({kind.encode(): slot for kind, slot in list(_FIELD_KINDS.items())})


def parse_model_fields(pairs: Iterable[Any]) -> list[ModelUsage]:
    """``["req|gpt-4o", 3, "in|gpt-4o", 100, ...]`` (or a dict) into rows per model.

    The snapshot parses one such hash per active user (100k a run), hence the lean
    loop: fields are split as bytes and only model names decoded, ``int()`` reads
    bytes directly, and a model's counters fill a plain list.
    """
    items = pairs.items() if isinstance(pairs, dict) else zip(*[iter(pairs)] * 2, strict=True)
    per_model: dict[Any, list[int]] = {}
    for raw_field, raw_value in items:
        kind, _, model = raw_field.partition(b"|" if isinstance(raw_field, bytes) else "|")
        slot = _FIELD_KINDS.get(kind)
        if slot is not None and model:
            counters = per_model.get(model)
            if counters is None:
                counters = per_model[model] = [0, 0, 0, 0]
            counters[slot] = int(raw_value)
    return [ModelUsage(text(model), *counters) for model, counters in sorted(per_model.items())]


#: Where a user's month comes back from when Redis lost it: ``(base_tokens, rows)``.
#: ``(base_tokens, [ModelUsage, ...])`` of a user's month, or a longer tuple that adds
#: the month's last snapshotted day and its base tokens (``restore.Restored``).
RestoreSource = Callable[[str, str], tuple[Any, ...]]
