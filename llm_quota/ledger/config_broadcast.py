"""Every process hears at once when an admin edits a tier, a quota or a price.

A save publishes on a Redis pub/sub channel (``KeySpace.config_channel()``) after its
transaction commits; each process (gunicorn or uvicorn worker, Celery worker) runs
one daemon thread subscribed to it, which drops that process' ``config_cache``.

Why pub/sub rather than a version number checked per request:
- reading a version key on each request is the extra round trip the gate must not
  pay; piggy-backing it on the reserve script's reply does not work on Redis Cluster
  (the reserve script runs in the user's slot and cannot read a key in another), and
  the request that learns of the change has already been decided on the old rows;
- a subscription costs nothing per request: one idle connection and one thread per
  process, and PUBLISH reaches every subscriber, on one Redis or on any cluster node.
What pub/sub does not promise is delivery to a process that is disconnected at that
moment. So every (re)subscription drops the whole cache (something may have been
missed meanwhile), and ``CONFIG_CACHE_SECONDS`` still bounds an entry's life.

Publishing waits for the commit: a process woken before it would reload the old rows
and keep them.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

from django.db import transaction

from llm_quota.conf import quota_settings
from llm_quota.ledger.connections import REDIS_ERRORS
from llm_quota.ledger.keys import KeySpace
from llm_quota.ledger.process_thread import PING_EVERY, ProcessThread, backoff
from llm_quota.rules.config_cache import ConfigCache, config_cache

logger = logging.getLogger("llm_quota")


@functools.lru_cache(maxsize=64)
def _channel_of(prefix: str) -> str:
    return KeySpace(prefix).config_channel()


def _channel() -> str:
    """The channel of the current ``KEY_PREFIX``. Every cached read asks (to follow a
    prefix change), so the name is built once per prefix, not once per read."""
    return _channel_of(quota_settings.KEY_PREFIX)


def _client() -> Any:
    from llm_quota.ledger.connections import ledger_client

    return ledger_client()


def announce() -> None:
    """Tell every process (this one included) to drop its cached rows."""
    config_cache.invalidate()
    try:
        _client().publish(_channel(), b"changed")
    except REDIS_ERRORS as exc:
        logger.warning(
            "could not announce a quota configuration change (%s); other processes pick "
            "it up within CONFIG_CACHE_SECONDS",
            exc,
        )


def user_changed(*args: Any, update_fields: Any = None, **kwargs: Any) -> None:
    """A user saved: API keys cache their user (``rules.api_keys``), so a change of
    ``is_active`` must reach every process; a login's ``last_login`` update need not."""
    if update_fields is not None and set(update_fields) <= {"last_login"}:
        return
    config_changed(*args, **kwargs)


def config_changed(*args: Any, using: str | None = None, **kwargs: Any) -> None:
    """Signal receiver for saves and deletes of Tier, ModelPrice and UserQuota."""
    config_cache.invalidate()  # this process, at once
    transaction.on_commit(announce, using=using)


class ConfigListener(ProcessThread):
    """This process' subscription; ``ensure_running`` is cheap enough for every read.

    ``connect`` returns the redis-py client to subscribe with (default: the ledger's);
    ``cache`` is what an announcement drops (default: the process' ``config_cache``).
    """

    name = "llm-quota-config-listener"

    def __init__(
        self, connect: Callable[[], Any] | None = None, cache: ConfigCache | None = None
    ) -> None:
        super().__init__()
        self._connect = connect or _client
        self._cache = cache or config_cache
        #: Set while subscribed (tests wait for it).
        self.subscribed = threading.Event()

    def ensure_running(self, key: Hashable = None) -> None:
        """Start the listener in this process (again after a fork, or a new prefix)."""
        super().ensure_running(_channel() if key is None else key)

    def prepare(self, key: Hashable, stop: threading.Event) -> Callable[[], None]:
        self.subscribed = subscribed = threading.Event()
        return functools.partial(self._listen, str(key), stop, subscribed)

    def _listen(self, channel: str, stop: threading.Event, subscribed: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self._connect().pubsub()
                pubsub.subscribe(channel)
                self._relay(pubsub, self._cache, stop, subscribed)
                failures = 0
            except (*REDIS_ERRORS, OSError) as exc:
                subscribed.clear()
                if failures == 0:
                    logger.warning("quota config listener lost Redis (%s); reconnecting", exc)
                stop.wait(backoff(failures))
                failures += 1
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (*REDIS_ERRORS, OSError):
                        pass

    @staticmethod
    def _relay(
        pubsub: Any, cache: ConfigCache, stop: threading.Event, subscribed: threading.Event
    ) -> None:
        idle = 0.0
        while not stop.is_set():
            message = pubsub.get_message(timeout=1.0)
            if message is None:
                idle += 1.0
                if idle >= PING_EVERY:
                    pubsub.ping()
                    idle = 0.0
                continue
            idle = 0.0
            if message["type"] == "subscribe":
                # Announcements sent while we were not subscribed are lost: start afresh.
                cache.invalidate()
                subscribed.set()
            elif message["type"] == "message":
                cache.invalidate()


listener = ConfigListener()
