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
    #: The body field that caps the output upstream (``max_tokens`` or
    #: ``max_completion_tokens``); blank: chosen from the model's name by the API shape.
    output_cap_field: str = ""
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
    #: Whose cap ``max_tokens_per_request`` is, as a refusal names it: the user's, or
    #: ``team.max_tokens_per_request`` where the team's is the lower.
    max_tokens_per_request_name: str = "max_tokens_per_request"
    global_tokens_per_day: int | None = None
    global_tokens_per_month: int | None = None
    #: The API key the request came with (its id), whose own limits below are reserved
    #: in the same step as the user's (contract section 9); None: no key.
    api_key: str | None = None
    key_requests_per_minute: int | None = None
    key_tokens_per_day: int | None = None
    key_tokens_per_month: int | None = None
    #: The team the request is charged to (its id; contract section 10), whose limits
    #: below apply to the team as a whole, in the same step as the user's; None: none.
    team: str | None = None
    team_requests_per_minute: int | None = None
    team_max_concurrent_requests: int | None = None
    team_tokens_per_day: int | None = None
    team_tokens_per_month: int | None = None
    #: The burn-rate breaker (contract §11): a minute's spend above ``burn_multiplier``
    #: x the caller's baseline and above ``burn_floor`` base tokens pauses the caller
    #: for ``burn_pause`` seconds. Any of the three None: off.
    burn_multiplier: float | None = None
    burn_floor: int | None = None
    burn_pause: float | None = None
    #: The team's own breaker, from the team's tier (an API key's is its user's tier's,
    #: the three above); None: off.
    team_burn_multiplier: float | None = None
    team_burn_floor: int | None = None
    team_burn_pause: float | None = None
    #: A tier that slows callers down past its soft limit (contract §11): the soft
    #: limit, in percent of ``tokens_per_month``. Past it, the request and token rates
    #: shrink as the rest of the budget runs out. None: the tier only alerts.
    slow_soft_percent: int | None = None


@dataclass(frozen=True)
class Estimate:
    """A request priced before the call: the prompt as counted, the output cap asked for."""

    price: Price
    prompt_tokens: int
    max_output_tokens: int
    #: False when ``prompt_tokens`` is the prompt's byte count, an upper bound that
    #: spared tokenizing a huge prompt (``quota.admission.admit_request``); settle corrects it.
    prompt_exact: bool = True
    #: The fewest prompt tokens the upstream can bill: from the counted text only, since
    #: ``prompt_tokens`` may hold bounds (an image's worst case, a file's context
    #: window). None: ``prompt_tokens`` was counted whole (``input_floor``).
    prompt_floor: int | None = None

    @property
    def model(self) -> str:
        return self.price.model

    @property
    def input_floor(self) -> int:
        """A reported prompt count below this is not a count (``fewest_tokens``)."""
        if self.prompt_floor is not None:
            return self.prompt_floor
        return fewest_tokens(self.prompt_tokens) if self.prompt_exact else 0

    @property
    def prompt_micro(self) -> int:
        return self.prompt_tokens * self.price.input_micro

    @property
    def base_tokens(self) -> int:
        return self.price.base_tokens(self.prompt_tokens, self.max_output_tokens)


#: The most tokens one call may report, input or output: above it a count is a broken
#: upstream, not a bill. 100 million is 50 times the longest context window on offer
#: (2M tokens) and 128 choices of the largest output caps, and small enough that the
#: base tokens of any price stay exact integers in the ledger's Lua (doubles: 2**53).
MAX_REPORTED_TOKENS = 100_000_000
#: The longest token of the tokenizers in use (cl100k_base, o200k_base) is 128 bytes,
#: so no text of ``n`` UTF-8 bytes is fewer than ``n / 128`` tokens, in any of them.
MAX_TOKEN_BYTES = 128


def fewest_tokens(byte_count: int) -> int:
    """The fewest tokens ``byte_count`` bytes of text can be (``MAX_TOKEN_BYTES``)."""
    return ceil_div(max(byte_count, 0), MAX_TOKEN_BYTES)


def token_count(value: object) -> int | None:
    """``value`` as a token count, or None where it cannot be one: not a number (a
    string, a boolean, null), negative, fractional, NaN or infinite, or above
    ``MAX_REPORTED_TOKENS``. A float with no fraction (``12.0``) is a count."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    if value < 0 or value > MAX_REPORTED_TOKENS:
        return None
    return value


def _field(obj: object, name: str) -> object:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _first(obj: object, *names: str) -> object:
    """The first of ``names`` that ``obj`` has (chat, then responses API names)."""
    for name in names:
        value = _field(obj, name)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class ActualUsage:
    """What the call really used, as the upstream reported it (or as counted)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: object, *, stand_in: ActualUsage) -> ActualUsage:
        """Read an OpenAI ``usage`` object or dict (chat or responses API names); a
        count that is not one (``token_count``) is ``stand_in``'s, never 0."""
        return ReportedUsage.read(usage).completed(stand_in.input_tokens, stand_in.output_tokens)


@dataclass(frozen=True)
class ReportedUsage:
    """An upstream's ``usage`` as reported, each count checked: None where the report
    cannot be charged (``token_count``), so the caller puts its own count there.

    A cached count that is not one is 0: the cached rate is the lower one, so
    ignoring it never under-charges.
    """

    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int = 0

    @classmethod
    def read(cls, usage: object) -> ReportedUsage:
        """From an OpenAI ``usage`` (object or dict) or an ``ActualUsage``."""
        if isinstance(usage, ActualUsage):
            return cls(
                token_count(usage.input_tokens),
                token_count(usage.output_tokens),
                token_count(usage.cached_input_tokens) or 0,
            )
        details = _first(usage, "prompt_tokens_details", "input_tokens_details")
        return cls(
            token_count(_first(usage, "prompt_tokens", "input_tokens")),
            token_count(_first(usage, "completion_tokens", "output_tokens")),
            token_count(_field(details, "cached_tokens")) or 0,
        )

    def plausible(self, *, input_floor: int = 0, output_floor: int = 0) -> ReportedUsage:
        """This report less the counts below what the call certainly used (a text's
        ``fewest_tokens``): 0 output tokens for a 20-token answer is not a count."""
        return ReportedUsage(
            None if self.input_tokens is None or self.input_tokens < input_floor
            else self.input_tokens,
            None if self.output_tokens is None or self.output_tokens < output_floor
            else self.output_tokens,
            self.cached_input_tokens,
        )  # fmt: skip

    @property
    def complete(self) -> bool:
        return self.input_tokens is not None and self.output_tokens is not None

    def completed(self, input_tokens: int, output_tokens: int) -> ActualUsage:
        """The usage to charge: the reported counts, the given ones where none stands."""
        charged_input = input_tokens if self.input_tokens is None else self.input_tokens
        return ActualUsage(
            charged_input,
            output_tokens if self.output_tokens is None else self.output_tokens,
            min(self.cached_input_tokens, charged_input),
        )
