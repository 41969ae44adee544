"""Write ``UsageSnapshot`` rows with one raw, parameterised upsert per batch.

Why raw SQL: ``bulk_create(update_conflicts=True)`` spends most of its time building
the statement (a model instance and eight per-field conversions for each row), and
the snapshot's rows are already plain values. One ``INSERT ... ON CONFLICT (user,
period, model) DO UPDATE`` does the same for a fraction of the cost: on PostgreSQL
one set-based statement per batch (see ``upsert_statement``), on SQLite (the demo)
``executemany``. Other backends keep the ORM. The measurements are in
``docs/pages/benchmarks.md``.

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

from django.contrib.auth import get_user_model
from django.db import connections, router

#: What a snapshot row holds, in the order of a row tuple after user and model: the
#: counters, then the generation they were copied in (``UsageSnapshot.generation``).
SNAPSHOT_FIELDS = ("requests", "input_tokens", "output_tokens", "base_tokens", "generation")

#: (user pk, model, requests, input tokens, output tokens, base tokens, generation)
Row = tuple[Any, str, int, int, int, int, int]


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


def read_stored(
    user_pks: Sequence[Any], period: date, *, using: str
) -> tuple[set[Any], dict[tuple[Any, str], tuple[int, ...]]]:
    """Which of ``user_pks`` exist, and their stored rows of ``period`` by (pk, model).

    On PostgreSQL one statement probes the primary key and the unique index once per
    user (LATERAL): the plain ``IN`` queries are planned from statistics, and while a
    first copy fills the table those still describe it empty, so the planner chose to
    read the whole period for every batch.
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return _read_stored_with_orm(user_pks, period, using=using)
    users = get_user_model()._meta
    meta = _model()._meta
    quote = connection.ops.quote_name
    user_pk = meta.get_field("user").target_field
    snap = {name: quote(meta.get_field(name).column) for name in ("user", "period", "model",
            *SNAPSHOT_FIELDS)}  # fmt: skip
    sql = (
        f"SELECT k.id, s.{snap['model']}, "
        + ", ".join(f"s.{snap[name]}" for name in SNAPSHOT_FIELDS)
        + f" FROM unnest(CAST(%s AS {user_pk.rel_db_type(connection)}[])) AS k(id)"
        f" CROSS JOIN LATERAL (SELECT 1 FROM {quote(users.db_table)}"
        f" WHERE {quote(users.pk.column)} = k.id) AS u"
        f" LEFT JOIN LATERAL (SELECT * FROM {quote(meta.db_table)}"
        f" WHERE {snap['user']} = k.id AND {snap['period']} = %s) AS s ON true"
    )
    db_pks = [user_pk.get_db_prep_value(pk, connection) for pk in user_pks]
    db_period = meta.get_field("period").get_db_prep_value(period, connection)
    known: set[Any] = set()
    stored: dict[tuple[Any, str], tuple[int, ...]] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, [db_pks, db_period])
        for pk, model, *values in cursor.fetchall():
            pk = user_pk.to_python(pk)
            known.add(pk)
            if model is not None:
                stored[(pk, model)] = tuple(values)
    return known, stored


def _read_stored_with_orm(
    user_pks: Sequence[Any], period: date, *, using: str
) -> tuple[set[Any], dict[tuple[Any, str], tuple[int, ...]]]:
    """SQLite and others: two indexed queries (SQLite's planner needs no statistics)."""
    known = set(
        get_user_model()
        ._default_manager.using(using)
        .filter(pk__in=list(user_pks))
        .values_list("pk", flat=True)
    )
    rows = (
        _model()
        .objects.using(using)
        .filter(period=period, user_id__in=known)
        .order_by()
        .values_list("user_id", "model", *SNAPSHOT_FIELDS)
    )
    return known, {(row[0], row[1]): tuple(row[2:]) for row in rows}


def upsert_statement(connection: Any) -> str:
    """The upsert, names quoted by ``connection``'s backend.

    PostgreSQL: one statement per batch, the rows passed as one array per column and
    unnested: a set-based insert costs the server a fraction of a statement per row,
    well under a pipelined ``executemany`` and close to COPY, which would need a
    staging table.
    Parameters: period, updated_at, then the arrays of user, model and counters.
    SQLite: one row's statement, for ``executemany`` (in-process: nothing to save).
    Parameters: user, period, model, counters, updated_at.
    """
    meta = _model()._meta
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    fields = {name: meta.get_field(name) for name in ("user", "period", "model",
              *SNAPSHOT_FIELDS, "updated_at")}  # fmt: skip
    column = {name: quote(field.column) for name, field in fields.items()}
    key = [column["user"], column["period"], column["model"]]
    written = [column[name] for name in (*SNAPSHOT_FIELDS, "updated_at")]
    if connection.vendor == "postgresql":
        arrays = ("user", "model", *SNAPSHOT_FIELDS)
        types = {"user": fields["user"].target_field.rel_db_type(connection)}
        casts = ", ".join(
            f"CAST(%s AS {types.get(name) or fields[name].db_type(connection)}[])"
            for name in arrays
        )
        source = (
            f"SELECT k.{column['user']}, %s, k.{column['model']}, "
            + ", ".join(f"k.{column[name]}" for name in SNAPSHOT_FIELDS)
            + f", %s FROM unnest({casts}) AS k({', '.join(column[name] for name in arrays)})"
        )
    else:
        source = f"VALUES ({', '.join(['%s'] * (len(key) + len(written)))})"
    # Only a row whose counters differ is rewritten; "updated_at" follows them.
    differs = " OR ".join(
        f"{table}.{column[name]} <> EXCLUDED.{column[name]}" for name in SNAPSHOT_FIELDS
    )
    return (
        f"INSERT INTO {table} ({', '.join(key + written)}) {source} "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in written)
        + f" WHERE {differs}"
    )


def upsert_rows(rows: Sequence[Row], period: date, now: datetime, *, using: str) -> int:
    """Insert or overwrite ``rows`` of ``period``; the number of rows inserted or changed.

    The caller holds the transaction. ``rows`` must not repeat a (user, model): one
    statement cannot update a row twice. ``period`` and ``now`` are converted once
    for the whole batch; the counters are plain ints and need no conversion.
    """
    if not rows:
        return 0
    connection = connections[using]
    if not supports_raw_upsert(using):
        return _upsert_with_orm(rows, period, using=using)
    meta = _model()._meta
    db_period = meta.get_field("period").get_db_prep_value(period, connection)
    db_now = meta.get_field("updated_at").get_db_prep_value(now, connection)
    user_pk = meta.get_field("user").target_field
    db_users = [user_pk.get_db_prep_value(row[0], connection) for row in rows]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            columns = [db_users, *([row[i] for row in rows] for i in range(1, 7))]
            cursor.execute(upsert_statement(connection), [db_period, db_now, *columns])
        else:
            params = [
                (db_user, db_period, row[1], *row[2:], db_now)
                for db_user, row in zip(db_users, rows, strict=True)
            ]
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
