"""A price file (JSON) loaded into ``ModelPrice``: public USD prices as base-token multipliers.

A base token is worth ``BASE_TOKEN_USD_PER_MILLION`` / 1e6 USD (default $2.50 per
million, GPT-4o's input price). A model whose tokens cost ``P`` USD per million is
therefore charged ``P / BASE_TOKEN_USD_PER_MILLION`` base tokens per token:
GPT-4o's input ($2.50) is 1, its output ($10) is 4, Claude Sonnet 4.5's output
($15) is 6. Multipliers are rounded *up* to the six places ``ModelPrice`` keeps, so
the rounding never under-charges.

The file (``llm_quota/data/model_prices.json`` is the bundled one)::

    {"models": [{"model": "gpt-4o", "input": "2.50", "cached_input": "1.25",
                 "output": "10.00", "encoding": "o200k_base",
                 "context_window": 128000, "default_max_output_tokens": 4096},
                {"model": "o3", ..., "output_cap_field": "max_completion_tokens"}]}

``input``/``output``/``cached_input`` are USD per million tokens; an entry may give
``input_multiplier``/``output_multiplier``/``cached_input_multiplier`` instead, for
models priced in base tokens directly. ``output_cap_field`` (``max_tokens`` or
``max_completion_tokens``; absent: by the model's name) is the field that caps the
output upstream. Other keys (``provider``) are ignored.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from llm_quota.ledger import keys
from llm_quota.models import OUTPUT_CAP_FIELDS

BUNDLED = Path(__file__).parent.parent / "data" / "model_prices.json"
PLACES = Decimal("0.000001")
DEFAULT_MAX_OUTPUT_TOKENS = 4096


class PriceFileError(ValueError):
    """The file, or one of its entries, cannot be loaded; the message says where."""


@dataclass(frozen=True)
class PriceRow:
    model: str
    input_multiplier: Decimal
    output_multiplier: Decimal
    cached_input_multiplier: Decimal | None
    encoding: str
    default_max_output_tokens: int
    context_window: int | None
    output_cap_field: str = ""

    def defaults(self) -> dict[str, Any]:
        """The ``ModelPrice`` fields, for ``update_or_create``."""
        return {
            "input_multiplier": self.input_multiplier,
            "output_multiplier": self.output_multiplier,
            "cached_input_multiplier": self.cached_input_multiplier,
            "encoding": self.encoding,
            "default_max_output_tokens": self.default_max_output_tokens,
            "context_window": self.context_window,
            "output_cap_field": self.output_cap_field,
            "enabled": True,
        }


def multiplier(usd_per_million: Decimal, base_usd_per_million: Decimal) -> Decimal:
    """Base tokens per token, rounded up to six places."""
    return (usd_per_million / base_usd_per_million).quantize(PLACES, rounding=ROUND_CEILING)


def _decimal(entry: dict[str, Any], name: str, where: str) -> Decimal | None:
    value = entry.get(name)
    if value is None:
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation as exc:
        raise PriceFileError(f"{where}: {name!r} is not a number: {value!r}") from exc
    if not number.is_finite() or number < 0:
        raise PriceFileError(f"{where}: {name!r} must be a non-negative number")
    return number


def _count(entry: dict[str, Any], name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PriceFileError(f"{where}: {name!r} must be a positive integer")
    return value


def _cap_field(entry: dict[str, Any], where: str) -> str:
    value = entry.get("output_cap_field") or ""
    if value and value not in dict(OUTPUT_CAP_FIELDS):
        names = " or ".join(name for name, _label in OUTPUT_CAP_FIELDS)
        raise PriceFileError(f"{where}: 'output_cap_field' must be {names}")
    return value


def _rate(entry: dict[str, Any], kind: str, base: Decimal, where: str) -> Decimal | None:
    direct = _decimal(entry, f"{kind}_multiplier", where)
    if direct is not None:
        return direct.quantize(PLACES, rounding=ROUND_CEILING)
    usd = _decimal(entry, kind, where)
    return None if usd is None else multiplier(usd, base)


def _model(entry: dict[str, Any], where: str) -> str:
    name = entry.get("model")
    if not isinstance(name, str) or not name:
        raise PriceFileError(f"{where}: 'model' is required")
    pattern = any(ch in name for ch in "*?[")
    if pattern:
        try:
            re.compile(fnmatch.translate(name))
        except re.error as exc:  # pragma: no cover - fnmatch escapes nearly everything
            raise PriceFileError(f"{where}: bad pattern {name!r}: {exc}") from exc
    elif not keys.is_valid_model_name(name):
        raise PriceFileError(f"{where}: {name!r} is not a valid model name")
    if len(name) > 128:
        raise PriceFileError(f"{where}: model names are at most 128 characters")
    return name


def parse(data: Any, base_usd_per_million: Decimal) -> list[PriceRow]:
    """The rows of a price file's parsed JSON, or ``PriceFileError``."""
    if base_usd_per_million <= 0:
        raise PriceFileError("BASE_TOKEN_USD_PER_MILLION must be positive")
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise PriceFileError("expected {'models': [...]} or a list of entries")
    rows: list[PriceRow] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"models[{index}]"
        if not isinstance(entry, dict):
            raise PriceFileError(f"{where}: each entry must be an object")
        model = _model(entry, where)
        if model in seen:
            raise PriceFileError(f"{where}: {model!r} appears twice")
        seen.add(model)
        inp = _rate(entry, "input", base_usd_per_million, where)
        out = _rate(entry, "output", base_usd_per_million, where)
        if inp is None or out is None:
            raise PriceFileError(f"{where}: both an input and an output price are required")
        encoding = entry.get("encoding") or ""
        if not isinstance(encoding, str):
            raise PriceFileError(f"{where}: 'encoding' must be a string")
        rows.append(
            PriceRow(
                model=model,
                input_multiplier=inp,
                output_multiplier=out,
                cached_input_multiplier=_rate(entry, "cached_input", base_usd_per_million, where),
                encoding=encoding,
                default_max_output_tokens=_count(entry, "default_max_output_tokens", where)
                or DEFAULT_MAX_OUTPUT_TOKENS,
                context_window=_count(entry, "context_window", where),
                output_cap_field=_cap_field(entry, where),
            )
        )
    return rows


def read(path: str | Path, base_usd_per_million: Decimal) -> list[PriceRow]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PriceFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise PriceFileError(f"{path} is not valid JSON: {exc}") from exc
    return parse(data, base_usd_per_million)


def load(
    rows: Iterable[PriceRow], *, on_row: Callable[[PriceRow, str], None] | None = None
) -> dict[str, int]:
    """Create or update a ``ModelPrice`` per row, in one transaction; counts per outcome."""
    from django.db import transaction

    from llm_quota.models import ModelPrice

    counts = {"created": 0, "updated": 0, "unchanged": 0}
    with transaction.atomic():
        for row in rows:
            existing = ModelPrice.objects.filter(model=row.model).first()
            wanted = row.defaults()
            if existing is None:
                ModelPrice.objects.create(model=row.model, **wanted)
                outcome = "created"
            elif all(getattr(existing, k) == v for k, v in wanted.items()):
                outcome = "unchanged"
            else:
                for name, value in wanted.items():
                    setattr(existing, name, value)
                existing.save()  # post_save invalidates every process's price cache
                outcome = "updated"
            counts[outcome] += 1
            if on_row is not None:
                on_row(row, outcome)
    return counts
