"""Write ``UsageSnapshot`` rows with one raw, parameterised upsert per batch.

Why raw SQL: a first copy of 10k users spent over half of its time in
``bulk_create(update_conflicts=True)``, most of it Django building the statement (a
model instance and eight per-field conversions for each row). The snapshot's rows are
already plain values, so one ``INSERT ... ON CONFLICT (user, period, model) DO UPDATE``
sent with ``executemany`` (pipelined by psycopg 3) does the same for a fraction of the
cost. PostgreSQL and SQLite (the demo) share this syntax; other backends keep the ORM.

The values are absolute, so repeating an upsert changes nothing, and the ``WHERE``
clause leaves a row that already holds them untouched (no write, no new
``updated_at``): a duplicate or concurrent run writes nothing.

Names come from the model's ``_meta`` and go through ``quote_name``; values are
always parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from django.db import connections, router

#: The counters a snapshot row holds, in the order of a row tuple after user and model.
SNAPSHOT_FIELDS = ("requests", "input_tokens", "output_tokens", "base_tokens")

#: (user pk, model, requests, input tokens, output tokens, base tokens)
Row = tuple[Any, str, int, int, int, int]


def _model() -> Any:
    from llm_quota.models import UsageSnapshot

    return UsageSnapshot


def database() -> str:
    """The alias the snapshot writes to (the router's choice for ``UsageSnapshot``)."""
    return router.db_for_write(_model())


def supports_raw_upsert(using: str) -> bool:
    """``INSERT ... ON CONFLICT (cols) DO UPDATE ... WHERE``: PostgreSQL and SQLite."""
    connection = connections[using]
    return connection.vendor in ("postgresql", "sqlite") and bool(
        connection.features.supports_update_conflicts_with_target
    )


def upsert_statement(connection: Any) -> str:
    """The statement for one row, names quoted by ``connection``'s backend."""
    meta = _model()._meta
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    column = {name: quote(meta.get_field(name).column) for name in (
        "user", "period", "model", *SNAPSHOT_FIELDS, "updated_at")}  # fmt: skip
    key = [column["user"], column["period"], column["model"]]
    written = [column[name] for name in (*SNAPSHOT_FIELDS, "updated_at")]
    # Only a row whose counters differ is rewritten; "updated_at" follows them.
    differs = " OR ".join(
        f"{table}.{column[name]} <> EXCLUDED.{column[name]}" for name in SNAPSHOT_FIELDS
    )
    return (
        f"INSERT INTO {table} ({', '.join(key + written)}) "
        f"VALUES ({', '.join(['%s'] * (len(key) + len(written)))}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in written)
        + f" WHERE {differs}"
    )


def upsert_rows(rows: Sequence[Row], period: date, now: datetime, *, using: str) -> int:
    """Insert or overwrite ``rows`` of ``period``; the number of rows inserted or changed.

    The caller holds the transaction. ``period`` and ``now`` are converted once for
    the whole batch; the counters are plain ints and need no conversion.
    """
    if not rows:
        return 0
    model = _model()
    connection = connections[using]
    if not supports_raw_upsert(using):
        return _upsert_with_orm(rows, period, using=using)
    meta = model._meta
    db_period = meta.get_field("period").get_db_prep_value(period, connection)
    db_now = meta.get_field("updated_at").get_db_prep_value(now, connection)
    user_pk = meta.get_field("user").target_field
    params = [
        (user_pk.get_db_prep_value(row[0], connection), db_period, row[1], *row[2:], db_now)
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(upsert_statement(connection), params)
        return max(cursor.rowcount, 0)


def _upsert_with_orm(rows: Sequence[Row], period: date, *, using: str) -> int:
    """Other backends: Django's own upsert (slower, but any backend that supports it)."""
    model = _model()
    model.objects.using(using).bulk_create(
        [
            model(
                user_id=row[0],
                period=period,
                model=row[1],
                **dict(zip(SNAPSHOT_FIELDS, row[2:], strict=True)),
            )
            for row in rows
        ],
        update_conflicts=True,
        unique_fields=["user", "period", "model"],
        update_fields=[*SNAPSHOT_FIELDS, "updated_at"],
    )
    return len(rows)
