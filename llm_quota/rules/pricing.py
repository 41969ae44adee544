"""Which ``ModelPrice`` row prices a model, as an ``accounting.Price``.

Exact names win; then the most specific pattern (longest, so ``gpt-4o-mini*`` beats
``gpt-4o*``); the ``*`` row only when ``UNKNOWN_MODEL = "default"``: a model missing
from the table must never cost nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import NamedTuple

from llm_quota.conf import quota_settings
from llm_quota.exceptions import ModelNotAllowed, UnknownModel
from llm_quota.rules.accounting import Price, to_micro
from llm_quota.rules.config_cache import config_cache

#: Model names whose resolution a price table remembers; past it, it starts afresh
#: (names come from callers, so the memo must not grow without bound).
MAX_RESOLVED = 4096


class PriceRows(NamedTuple):
    """The price table as cached: exact names, patterns (longest first), the ``*`` row,
    disabled names, and each asked-for name resolved so far. The memo lives and dies
    with the cached rows, so a save (or a settings change) empties it; a name matched
    by a pattern costs the pattern scan once, not on every request."""

    exact: dict[str, Price]
    patterns: list[tuple[str, Price]]
    fallback: Price | None
    disabled: set[str]
    resolved: dict[str, Price | None]


def _price_rows() -> PriceRows:
    from llm_quota.models import ModelPrice

    exact: dict[str, Price] = {}
    patterns: list[tuple[str, Price]] = []
    fallback: Price | None = None
    disabled: set[str] = set()
    for row in ModelPrice.objects.all():
        if not row.enabled:
            disabled.add(row.model)
            continue
        price = Price(
            model=row.model,
            input_micro=to_micro(row.input_multiplier),
            output_micro=to_micro(row.output_multiplier),
            cached_input_micro=(
                None
                if row.cached_input_multiplier is None
                else to_micro(row.cached_input_multiplier)
            ),
            encoding=row.encoding,
            default_max_output_tokens=row.default_max_output_tokens,
            context_window=row.context_window,
            output_cap_field=row.output_cap_field,
        )
        if row.model == "*":
            fallback = price
        elif row.is_pattern:
            patterns.append((row.model, price))
        else:
            exact[row.model] = price
    patterns.sort(key=lambda item: len(item[0]), reverse=True)
    return PriceRows(exact, patterns, fallback, disabled, {})


def price_for(model: str) -> Price:
    """The price of ``model`` under its own name, or ``UnknownModel``/``ModelNotAllowed``."""
    return price_in(config_cache.get("prices", _price_rows), model)


def price_in(rows: PriceRows, model: str) -> Price:
    if model in rows.disabled:
        raise ModelNotAllowed(f"The model '{model}' is disabled.")
    try:
        found = rows.resolved[model]
    except KeyError:
        found = _resolve(rows, model)
        if len(rows.resolved) >= MAX_RESOLVED:
            rows.resolved.clear()
        rows.resolved[model] = found
    if found is None:
        raise UnknownModel(f"The model '{model}' does not exist or has no price.")
    return found


def _resolve(rows: PriceRows, model: str) -> Price | None:
    found = rows.exact.get(model)
    if found is not None:
        return found
    for pattern, price in rows.patterns:
        if fnmatch.fnmatchcase(model, pattern):
            found = price
            break
    if found is None and rows.fallback is not None and quota_settings.UNKNOWN_MODEL == "default":
        found = rows.fallback
    if found is None:
        return None
    # Usage is accounted under the name the caller asked for, not the pattern (up to
    # ``MODEL_NAMES_PER_MONTH`` names a month: the pattern says what to record beyond).
    return dataclasses.replace(found, model=model, pattern=found.model)


def priced_models() -> list[str]:
    """Exact model names with a price (what ``/v1/models`` can list)."""
    return sorted(config_cache.get("prices", _price_rows).exact)
