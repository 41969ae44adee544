"""What a request costs in base tokens, as plain values: prices, limits, estimates, usage.

A request's base tokens are ceil(input x input multiplier + output x output
multiplier), cached input at its own multiplier where the model has one. Nothing
here touches Django or Redis, so the rules can be read (and tested) alone.

Prices are held as integer *micro* base tokens per token: Redis and Lua only have
integers and doubles, and a Decimal multiplier with six places converts exactly, so
the Lua script and Python round the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, localcontext

MICRO = 1_000_000


def to_micro(multiplier: Decimal | str | int | float) -> int:
    """Micro base tokens per token; rounded up, so a price is never under-charged."""
    with localcontext() as exact:  # no rounding before the ceiling: never a hair under
        exact.prec = 200
        value = Decimal(str(multiplier)) * MICRO
    if value < 0:
        raise ValueError("a price multiplier may not be negative")
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class Price:
    """What one model's tokens cost in base tokens (per token, in micro units)."""

    model: str
    input_micro: int
    output_micro: int
    cached_input_micro: int | None = None
    encoding: str = ""
    default_max_output_tokens: int = 4096
    context_window: int | None = None
    #: The pattern row that priced ``model`` (``None``: a row of its own name). Names a
    #: pattern matches are the caller's to invent; usage past ``MODEL_NAMES_PER_MONTH``
    #: of them is recorded under the pattern.
    pattern: str | None = None

    def base_tokens(
        self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> int:
        """ceil(input x in + output x out), cached input at its own rate where set."""
        cached = min(max(cached_input_tokens, 0), input_tokens)
        cached_rate = (
            self.input_micro if self.cached_input_micro is None else self.cached_input_micro
        )
        micro = (
            (input_tokens - cached) * self.input_micro
            + cached * cached_rate
            + output_tokens * self.output_micro
        )
        return ceil_div(micro, MICRO)


@dataclass(frozen=True)
class Limits:
    """A user's effective limits; ``None`` means unlimited. Token limits are base tokens."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    max_concurrent_requests: int | None = None
    max_tokens_per_request: int | None = None
    global_tokens_per_day: int | None = None
    global_tokens_per_month: int | None = None


@dataclass(frozen=True)
class Estimate:
    """A request priced before the call: the prompt as counted, the output cap asked for."""

    price: Price
    prompt_tokens: int
    max_output_tokens: int
    #: False when ``prompt_tokens`` is the prompt's byte count, an upper bound that
    #: spared tokenizing a huge prompt (``quota.admission.admit_request``); settle corrects it.
    prompt_exact: bool = True

    @property
    def model(self) -> str:
        return self.price.model

    @property
    def prompt_micro(self) -> int:
        return self.prompt_tokens * self.price.input_micro

    @property
    def base_tokens(self) -> int:
        return self.price.base_tokens(self.prompt_tokens, self.max_output_tokens)


@dataclass(frozen=True)
class ActualUsage:
    """What the call really used, as the upstream reported it (or as counted)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: object) -> ActualUsage:
        """Read an OpenAI ``usage`` object or dict (chat or responses API names)."""

        def get(obj: object, name: str) -> object:
            if obj is None:
                return None
            if isinstance(obj, dict):
                return obj.get(name)
            return getattr(obj, name, None)

        def count(value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return 0
            if isinstance(value, float) and not math.isfinite(value):
                return 0  # JSON's Infinity/NaN from a broken upstream: not a count
            return max(int(value), 0)

        prompt = count(get(usage, "prompt_tokens") or get(usage, "input_tokens"))
        completion = count(get(usage, "completion_tokens") or get(usage, "output_tokens"))
        details = get(usage, "prompt_tokens_details") or get(usage, "input_tokens_details")
        cached = count(get(details, "cached_tokens"))
        return cls(prompt, completion, min(cached, prompt))
