"""``manage.py llm_quota_load_prices FILE``: create or update model prices from JSON.

The derivation (USD per million tokens → base tokens per token) and the file format
are in ``llm_quota.management.price_file``. ``--bundled`` loads the list shipped with the app.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from llm_quota.conf import quota_settings
from llm_quota.management import price_file
from llm_quota.management.progress import progress


class Command(BaseCommand):
    help = (
        "Create or update ModelPrice rows from a JSON file of per-million USD prices, "
        "converted to base-token multipliers with LLM_QUOTA['BASE_TOKEN_USD_PER_MILLION']."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("file", nargs="?", help="the JSON price file")
        parser.add_argument(
            "--bundled", action="store_true", help=f"load {price_file.BUNDLED.name} (shipped)"
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="show the multipliers, change nothing"
        )

    def handle(self, *args: Any, file: str | None, bundled: bool, dry_run: bool, **options: Any):
        if bool(file) == bundled:
            raise CommandError("Give a FILE or --bundled (one of them).")
        path = file or price_file.BUNDLED  # exactly one of them
        base = Decimal(str(quota_settings.BASE_TOKEN_USD_PER_MILLION))
        try:
            rows = price_file.read(path, base)
        except price_file.PriceFileError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"{len(rows)} prices from {path}; 1 base token = ${base} per million tokens."
        )
        if dry_run:
            for row in rows:
                self._row(row, "would load")
            return
        bar = progress(len(rows), desc="Loading prices", unit="model", file=self.stderr)

        def on_row(row: price_file.PriceRow, outcome: str) -> None:
            bar.set_postfix_str(row.model)
            bar.update(1)
            if outcome != "unchanged" and options.get("verbosity", 1) > 1:
                self._row(row, outcome)

        try:
            counts = price_file.load(rows, on_row=on_row)
        finally:
            bar.close()
        self.stdout.write(
            self.style.SUCCESS(
                f"{counts['created']} created, {counts['updated']} updated, "
                f"{counts['unchanged']} unchanged."
            )
        )

    def _row(self, row: price_file.PriceRow, outcome: str) -> None:
        cached = "-" if row.cached_input_multiplier is None else row.cached_input_multiplier
        self.stdout.write(
            f"  {outcome:<10} {row.model:<24} in {row.input_multiplier:>10} "
            f"out {row.output_multiplier:>10} cached {cached}"
        )
