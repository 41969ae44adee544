"""The gateway's database connections, handed back before it waits on the upstream.

A request keeps the connections it used until it ends, and a chat call lasts as
long as the LLM writes (seconds, minutes for a stream). With a connection pool
(PostgreSQL's ``OPTIONS["pool"]``) that would hold a pooled connection idle for the
whole call, and a burst of calls would wait for the pool, then fail. Authentication
and admission are done by the time the upstream is called, so the connections go
back to the pool then; a later read (a soft-limit alert at settle) takes one again.

Only pooled connections, outside a transaction: a connection kept across requests
(``CONN_MAX_AGE``) is left to Django, and one in ``ATOMIC_REQUESTS`` stays with it.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async

from llm_quota.quota.drivers import sync_work
from llm_quota.quota.pooled_connections import hand_back, pooled

__all__ = ["ahand_back", "hand_back", "pooled", "sync_thread_used"]


def sync_thread_used() -> bool:
    """Whether the request's plans ran sync code that may still hold a connection in its
    thread (a signal's receivers; a plan's ``Blocking`` step hands its connections back
    itself); True when nothing recorded it (``drivers.track_sync_work``). A connection a
    sync middleware opened is left to the request's end, as Django does."""
    work = sync_work()
    return work is None or work.ran


async def ahand_back() -> None:
    """``hand_back`` in the thread where the request's sync code (and the ORM) ran, if
    it ran: a warm request (everything from the config cache) makes no hop here."""
    if pooled() and sync_thread_used():
        await sync_to_async(hand_back)()
