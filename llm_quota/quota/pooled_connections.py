"""Pooled database connections, handed back as soon as the code that used them is done.

With a connection pool (PostgreSQL's ``OPTIONS["pool"]``) a request holding a connection
it no longer uses keeps it from every request waiting on the pool. Under ASGI that
matters most: a plan's ORM step runs in a thread, and the loop, when it runs late under
load, may take seconds to reach the request's end, where Django would close it.

Only pooled connections, outside a transaction: a connection kept across requests
(``CONN_MAX_AGE``) is left to Django, and one in ``ATOMIC_REQUESTS`` stays with it.
"""

from __future__ import annotations

from django.db import connections


def pooled() -> bool:
    """Whether any configured database is pooled."""
    return any(
        (options.get("OPTIONS") or {}).get("pool") for options in connections.settings.values()
    )


def hand_back() -> None:
    """Return this thread's pooled connections to their pools, outside transactions."""
    for connection in connections.all(initialized_only=True):
        if (
            connection.connection is not None
            and getattr(connection, "pool", None) is not None
            and not connection.in_atomic_block
        ):
            connection.close()
