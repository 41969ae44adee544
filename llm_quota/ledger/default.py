"""The project's ledger, built from ``LLM_QUOTA`` settings: one per process, and its
async twin per event loop.

Tests swap it with ``set_default_ledger`` (a pinned clock, a prefix of their own). A
settings change drops it; the next caller builds it again.
"""

from __future__ import annotations

import threading

from asgiref.sync import sync_to_async

from llm_quota.conf import quota_settings, reset_on_change
from llm_quota.ledger import resilience
from llm_quota.ledger.async_driver import AsyncLedger, twin_of
from llm_quota.ledger.connections import ledger_client
from llm_quota.ledger.restore import key_months_from_snapshots, month_from_snapshots
from llm_quota.ledger.sentinel_watch import watcher
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.ledger.team_restore import team_month_from_snapshots

_default: Ledger | None = None
_default_lock = threading.Lock()


def get_ledger() -> Ledger:
    """The django-redis cache's client, or a ``RedisCluster`` where
    ``REDIS_CLUSTER_URL`` is set (see ``connections.py``)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Ledger(
                    ledger_client(),
                    prefix=quota_settings.KEY_PREFIX,
                    reservation_ttl=quota_settings.RESERVATION_TTL,
                    timezone=quota_settings.PERIOD_TIMEZONE,
                    restore=month_from_snapshots,
                    restore_keys=key_months_from_snapshots,
                    restore_teams=team_month_from_snapshots,
                )
    watcher.ensure_running()  # again in a forked worker (nothing for plain Redis)
    return _default


def current_ledger() -> Ledger | None:
    """The project's ledger if it was built, without building it (no connection)."""
    return _default


def set_default_ledger(ledger: Ledger | None) -> None:
    """Swap the project's ledger. A new ledger starts with a closed circuit breaker and
    an empty outage journal."""
    global _default
    _default = ledger
    resilience.reset()


@reset_on_change
def reset_default_ledger() -> None:
    set_default_ledger(None)


async def get_async_ledger() -> AsyncLedger:
    """The async twin of ``get_ledger()`` for the running event loop.

    Follows ``set_default_ledger``: a swapped sync ledger gets its own twin. Building
    the sync ledger the first time may connect (a cluster reads its slot map), so that
    happens in a thread, not on the loop.
    """
    sync = _default
    if sync is None:
        sync = await sync_to_async(get_ledger, thread_sensitive=False)()
    else:
        watcher.ensure_running()
    return twin_of(sync)
