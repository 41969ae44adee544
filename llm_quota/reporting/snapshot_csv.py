"""``UsageSnapshot`` rows as CSV, streamed, for the admin's export."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator

from django.db.models import QuerySet

from llm_quota.models import UsageSnapshot
from llm_quota.reporting.cost import cost_usd

CSV_HEADER = (
    "user_id", "username", "period", "model", "requests", "input_tokens", "output_tokens",
    "base_tokens", "cost_usd", "updated_at",
)  # fmt: skip


class _Echo:
    """A file-like whose write returns the line: csv.writer into a streaming response."""

    def write(self, value: str) -> str:
        return value


def csv_rows(snapshots: QuerySet[UsageSnapshot] | Iterable[UsageSnapshot]) -> Iterator[str]:
    """CSV lines (header first) of snapshot rows, for a ``StreamingHttpResponse``."""
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_HEADER)
    if isinstance(snapshots, QuerySet):
        snapshots = snapshots.select_related("user").order_by("period", "user_id", "model")
        snapshots = snapshots.iterator(chunk_size=2000)
    for row in snapshots:
        yield writer.writerow(
            (
                row.user_id, _safe_cell(row.user.get_username()), row.period.isoformat(),
                _safe_cell(row.model), row.requests, row.input_tokens, row.output_tokens,
                row.base_tokens, cost_usd(row.base_tokens), row.updated_at.isoformat(),
            )
        )  # fmt: skip


def _safe_cell(text: str) -> str:
    """No formula injection when the CSV is opened in a spreadsheet."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text
