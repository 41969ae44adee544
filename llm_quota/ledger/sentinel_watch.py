"""Every process follows a Sentinel failover as soon as a Sentinel announces it.

redis-py's Sentinel pool asks the Sentinels where the primary is only when it opens a
connection. After a failover that leaves the old primary up (``SENTINEL FAILOVER``, a
network partition healed), warm connections keep writing to the old primary until
Sentinel demotes it (12 to 17 s, on its INFO cycle), and its resync then throws those
writes away: reserves and settles lost (docs/pages/reliability.md, "Sentinel
failover").

So each process that uses a Sentinel-managed ledger client runs one daemon thread
that subscribes to ``+switch-master`` on every Sentinel it can reach (any one is
enough to hear a switch) and, on a switch of a watched service, makes each watched
pool ask again (``get_master_address()``): the pool then disconnects its idle
connections, and the ones in use are dropped as they are released (the sync pool's
``owns_connection``; the async pool's reconnect mark), so the next command goes to the
new primary. The message only wakes the thread; the address is asked of the Sentinel
with the highest ``config-epoch`` (a Sentinel that was away may announce an old switch
when it comes back). Every ``RECHECK_EVERY`` seconds, and on each (re)subscription,
the pools ask again anyway, in case an announcement was missed.

Plain Redis and Cluster clients are not watched: no thread starts for them.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from redis.exceptions import RedisError

from llm_quota.ledger.connection_kwargs import portable
from llm_quota.ledger.process_thread import PING_EVERY, ProcessThread, backoff

logger = logging.getLogger("llm_quota")

CHANNEL = "+switch-master"
#: Seconds between the safety net's questions to the Sentinels, when none announced.
RECHECK_EVERY = 5.0
#: The thread's longest sleep: how late it notices that it should stop.
POLL = 1.0
#: Off only to measure what the watcher saves (tests/system/test_sentinel_switch.py).
ENABLED = True

_ERRORS = (RedisError, OSError, ValueError)
Endpoint = tuple[str, int]


def _own_client(sentinel: Any) -> Any:
    """A client of the Sentinel that ``sentinel`` (a pool's) talks to, for the thread:
    it never retries (redis-py's default retries a refused connection for about 4 s,
    which would stall the thread on a Sentinel that is down) and never waits forever."""
    import redis
    from redis.backoff import NoBackoff
    from redis.connection import SSLConnection
    from redis.retry import Retry

    pool = sentinel.connection_pool
    kwargs: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    kwargs.update(portable(pool.connection_kwargs))
    ssl = issubclass(pool.connection_class, SSLConnection)
    return redis.Redis(**kwargs, ssl=ssl, retry=Retry(NoBackoff(), 0))


def _endpoint(sentinel: Any) -> Endpoint:
    kwargs = sentinel.connection_pool.connection_kwargs
    return str(kwargs["host"]), int(kwargs["port"])


def _ask_first(manager: Any, endpoint: Endpoint | None) -> None:
    """Put the Sentinel at ``endpoint`` first in ``manager``'s list: redis-py asks them
    in order and takes the first answer (and reorders the list the same way itself)."""
    if endpoint is None:
        return
    sentinels = manager.sentinels
    for n, sentinel in enumerate(sentinels):
        if _endpoint(sentinel) == endpoint:
            sentinels[0], sentinels[n] = sentinel, sentinels[0]
            return


async def _refresh_async(pool: Any, freshest: Endpoint | None) -> None:
    """On the pool's own loop (its connections belong to it)."""
    _ask_first(pool.sentinel_manager, freshest)
    before = pool.master_address
    address = await pool.get_master_address()  # drops the idle connections if it moved
    if before is not None and address != before:
        # redis.asyncio's pool does not check ``owns_connection`` on release: mark the
        # connections in use, so each is dropped when it comes back.
        await pool.update_active_connections_for_reconnect()


class _Link:
    """A subscription to one Sentinel's ``+switch-master``, and the client that asks it
    where a primary is."""

    def __init__(self, sentinel: Any) -> None:
        self.client = _own_client(sentinel)
        self.pubsub: Any = None
        self.failures = 0
        self.retry_at = 0.0
        self.idle_since = time.monotonic()

    def open(self) -> None:
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(CHANNEL)
        self.idle_since = time.monotonic()

    @property
    def up(self) -> bool:
        return self.pubsub is not None

    def close(self, now: float | None = None) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except _ERRORS:
                pass
        self.pubsub = None
        if now is not None:  # it failed: wait before the next try
            self.retry_at = now + backoff(self.failures)
            self.failures += 1

    def socket(self) -> Any:
        connection = getattr(self.pubsub, "connection", None)
        return getattr(connection, "_sock", None)

    def messages(self) -> Iterable[dict[str, Any]]:
        while (message := self.pubsub.get_message(timeout=0)) is not None:
            self.idle_since = time.monotonic()
            yield message
        if time.monotonic() - self.idle_since >= PING_EVERY:
            self.pubsub.ping()  # a dead socket raises here, and is reopened
            self.idle_since = time.monotonic()


class SwitchWatcher(ProcessThread):
    """The process' watcher: ``watch`` a sync pool, ``watch_async`` an async one."""

    name = "llm-quota-sentinel-watch"

    def __init__(self) -> None:
        super().__init__()
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._async: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = (
            weakref.WeakKeyDictionary()
        )
        self._pools_lock = threading.Lock()
        #: The Sentinels this process' thread is subscribed to now (tests wait for it).
        self.listening: set[Endpoint] = set()
        #: How many times a pool was told to ask again because a Sentinel announced.
        self.switches_heard = 0

    # -- what is watched ----------------------------------------------------------------

    def watch(self, client: Any) -> None:
        """Follow the primary of ``client``'s pool, if Sentinel manages it."""
        from redis.sentinel import SentinelConnectionPool

        pool = getattr(client, "connection_pool", None)
        if not ENABLED or not isinstance(pool, SentinelConnectionPool) or not pool.is_master:
            return
        with self._pools_lock:
            self._pools.add(pool)
        self.ensure_running()

    def watch_async(self, client: Any, like: Any) -> None:
        """Follow the primary of a ``redis.asyncio`` Sentinel client made in the running
        loop; ``like`` is the sync client it mirrors (same Sentinels, same service)."""
        pool = getattr(client, "connection_pool", None)
        if not ENABLED or not getattr(pool, "is_master", False):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # made outside a loop: its loop is not known yet
            return
        with self._pools_lock:
            self._async[pool] = loop
        self.watch(like)

    def ensure_running(self, key: Hashable = None) -> None:
        """Start the thread in this process if anything is watched (after a fork too);
        cheap enough to call for every request."""
        if self._pools:
            super().ensure_running(key)

    def forget(self) -> None:
        """Watch nothing, and end the thread (it starts again with the next ``watch``)."""
        with self._pools_lock:
            self._pools.clear()
            self._async.clear()
        self.stop()

    def _watched(self) -> tuple[list[Any], list[tuple[Any, asyncio.AbstractEventLoop]]]:
        with self._pools_lock:
            return list(self._pools), list(self._async.items())

    # -- the thread ---------------------------------------------------------------------

    def prepare(self, key: Hashable, stop: threading.Event) -> Callable[[], None]:
        listening: set[Endpoint] = set()
        self.listening = listening
        return lambda: self._run(stop, listening)

    def _run(self, stop: threading.Event, listening: set[Endpoint]) -> None:
        links: dict[Endpoint, _Link] = {}
        recheck_at = time.monotonic() + RECHECK_EVERY
        try:
            while not stop.is_set():
                pools, _ = self._watched()
                services: dict[str, set[Endpoint]] = {}
                for pool in pools:
                    endpoints = services.setdefault(pool.service_name, set())
                    endpoints.update(map(_endpoint, pool.sentinel_manager.sentinels))
                heard = self._connect(links, pools, listening)
                self._wait(links, min(POLL, max(0.0, recheck_at - time.monotonic())))
                heard |= self._read(links, set(services), listening)
                if time.monotonic() >= recheck_at:
                    heard |= set(services)
                    recheck_at = time.monotonic() + RECHECK_EVERY
                for service in heard:
                    # Only the Sentinels subscribed to: asking one that is down stalls.
                    up = {e: links[e] for e in services.get(service, ()) if links[e].up}
                    if up:
                        self.refresh(service, up)
        finally:
            for link in links.values():
                link.close()
            listening.clear()

    def _connect(
        self, links: dict[Endpoint, _Link], pools: list[Any], listening: set[Endpoint]
    ) -> set[str]:
        """Subscribe to every Sentinel of the watched pools that is not subscribed yet
        (one that failed, after its backoff). Returns the services to ask again: after a
        (re)subscription, an announcement may have been missed."""
        wanted: dict[Endpoint, Any] = {}
        for pool in pools:
            for sentinel in pool.sentinel_manager.sentinels:
                wanted.setdefault(_endpoint(sentinel), sentinel)
        for endpoint in set(links) - set(wanted):
            links.pop(endpoint).close()
            listening.discard(endpoint)
        missed: set[str] = set()
        now = time.monotonic()
        for endpoint, sentinel in wanted.items():
            link = links.get(endpoint) or links.setdefault(endpoint, _Link(sentinel))
            if link.up or now < link.retry_at:
                continue
            try:
                link.open()
            except _ERRORS as exc:
                if link.failures == 0:
                    logger.warning("Sentinel %s:%s unreachable (%s)", *endpoint, exc)
                link.close(now)
                continue
            missed |= {pool.service_name for pool in pools}
        return missed

    @staticmethod
    def _wait(links: dict[Endpoint, _Link], seconds: float) -> None:
        sockets = [s for link in links.values() if (s := link.socket()) is not None]
        if not sockets:
            time.sleep(seconds)
            return
        try:
            select.select(sockets, [], [], seconds)
        except (OSError, ValueError):  # a socket closed meanwhile: read() finds out
            pass

    def _read(
        self, links: dict[Endpoint, _Link], services: set[str], listening: set[Endpoint]
    ) -> set[str]:
        heard: set[str] = set()
        for endpoint, link in links.items():
            if not link.up:
                continue
            try:
                for message in link.messages():
                    if message["type"] == "subscribe":
                        link.failures = 0
                        listening.add(endpoint)
                    elif message["type"] == "message":
                        # "<service> <old-ip> <old-port> <new-ip> <new-port>"
                        data = message["data"]
                        if isinstance(data, bytes):
                            data = data.decode(errors="replace")
                        service = str(data).split(" ", 1)[0]
                        if service in services:
                            heard.add(service)
                            self.switches_heard += 1
            except _ERRORS as exc:
                logger.warning("lost the Sentinel subscription (%s); reconnecting", exc)
                link.close(time.monotonic())
                listening.discard(endpoint)
        return heard

    # -- asking again -------------------------------------------------------------------

    @staticmethod
    def freshest(service: str, links: dict[Endpoint, _Link]) -> Endpoint | None:
        """Of ``links``' Sentinels, the one whose view of ``service`` has the highest
        ``config-epoch``."""
        best: tuple[int, Endpoint] | None = None
        for endpoint, link in links.items():
            try:
                state = link.client.sentinel_master(service)
            except _ERRORS:
                continue
            epoch = int(state.get("config-epoch", 0))
            if best is None or epoch > best[0]:
                best = (epoch, endpoint)
        return best[1] if best is not None else None

    def refresh(self, service: str, links: dict[Endpoint, _Link]) -> None:
        """Make every watched pool of ``service`` ask the Sentinels where its primary is
        now (the freshest of ``links`` first): one that moved drops its connections to
        the old one. Never raises."""
        pools, async_pools = self._watched()
        freshest = self.freshest(service, links)
        for pool in pools:
            if pool.service_name != service:
                continue
            try:
                _ask_first(pool.sentinel_manager, freshest)
                pool.get_master_address()
            except _ERRORS as exc:
                logger.warning("could not ask the Sentinels for %r (%s)", service, exc)
        for pool, loop in async_pools:
            if pool.service_name != service or loop.is_closed():
                continue
            try:
                future = asyncio.run_coroutine_threadsafe(_refresh_async(pool, freshest), loop)
            except RuntimeError:  # the loop closed meanwhile
                continue
            future.add_done_callback(_log_failure)


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not ask the Sentinels again (%s)", future.exception())


watcher = SwitchWatcher()
