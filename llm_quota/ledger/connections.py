"""Which Redis the ledger talks to, sync and async.

One Redis (or Sentinel): the django-redis cache alias ``REDIS_CACHE_ALIAS``, so the
project configures Redis once, in ``CACHES``. Redis Cluster: django-redis has no
cluster client, so ``REDIS_CLUSTER_URL`` (``redis+cluster://host:port[,host:port]``)
builds redis-py's ``RedisCluster`` here.

The async client is derived from the sync one (same server, database, credentials,
timeouts, Sentinel service or cluster nodes), so the two ledgers can never point at
different Redis servers. A Sentinel-managed client of either kind is watched
(``sentinel_watch``): it follows a failover as soon as a Sentinel announces it.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import RedisClusterException, RedisError

from llm_quota.conf import quota_settings, reset_on_change
from llm_quota.ledger.connection_kwargs import portable
from llm_quota.ledger.sentinel_watch import watcher

#: What "Redis is unavailable" looks like: a cluster missing a slot's node raises
#: RedisClusterException, which is not a RedisError.
REDIS_ERRORS = (RedisError, RedisClusterException)

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: Connections per event loop to one Redis. Callers beyond it wait for a free one
#: (a blocking pool): refusing them would count as an outage and admit unmetered.
ASYNC_POOL_SIZE = 64
ASYNC_POOL_WAIT = 10.0

_cluster: Any = None
_cluster_lock = threading.Lock()


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and urlsplit(str(url)).scheme in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis+cluster://a:1,b:2/…`` into a redis-py URL for the first node and the
    others as extra startup nodes (any one of them is enough to discover the rest)."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    first, *others = hosts.split(",")
    netloc = f"{userinfo}@{first}" if userinfo else first
    extra = []
    for node in others:
        host, _, port = node.rpartition(":")
        extra.append((host.strip("[]"), int(port or 6379)))
    return urlunsplit((scheme, netloc, parts.path, parts.query, "")), extra


def cluster_client(url: str, **kwargs: Any) -> Any:
    """A ``RedisCluster`` from a ``redis+cluster://`` (or plain ``redis://``) URL."""
    from redis.cluster import ClusterNode, RedisCluster

    first, others = cluster_nodes(url)
    if others:
        parts = urlsplit(first)
        nodes = [ClusterNode(parts.hostname, parts.port or 6379)]
        nodes += [ClusterNode(host, port) for host, port in others]
        kwargs["startup_nodes"] = nodes
    return RedisCluster.from_url(first, **kwargs)


def ledger_client() -> Any:
    """The sync client of the project's ledger, as the settings choose."""
    url = quota_settings.REDIS_CLUSTER_URL
    if url:
        global _cluster
        with _cluster_lock:
            if _cluster is None:
                # A gate must answer fast when a node is gone (then FAIL_OPEN decides);
                # the URL's own ?socket_timeout=… wins over these.
                _cluster = cluster_client(url, socket_timeout=1, socket_connect_timeout=1)
            return _cluster
    from django_redis import get_redis_connection

    client = get_redis_connection(quota_settings.REDIS_CACHE_ALIAS)
    watcher.watch(client)  # a Sentinel pool follows failovers at once (sentinel_watch)
    return client


@reset_on_change
def reset() -> None:
    """Forget the cluster client and the watched Sentinel pools (settings changed: the
    next ledger client is watched again if it is Sentinel's)."""
    global _cluster
    with _cluster_lock:
        _cluster = None
    watcher.forget()


# -- the async twin ------------------------------------------------------------------


def async_client_like(client: Any) -> Any:
    """A ``redis.asyncio`` client for the same Redis as the redis-py ``client``.

    Handles a plain ``Redis`` (TCP, TLS or unix socket), a Sentinel-managed pool
    (what django-redis' ``SentinelClient`` builds) and a ``RedisCluster``.
    """
    from redis.cluster import RedisCluster
    from redis.sentinel import SentinelConnectionPool

    if isinstance(client, RedisCluster):
        return _async_cluster_like(client)
    pool = client.connection_pool
    kwargs = portable(pool.connection_kwargs)
    if isinstance(pool, SentinelConnectionPool):
        twin = _async_sentinel_like(pool, kwargs)
        watcher.watch_async(twin, like=client)
        return twin
    import redis.asyncio as aioredis
    from redis.asyncio import connection as aio
    from redis.connection import SSLConnection, UnixDomainSocketConnection

    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        kwargs.pop("host", None), kwargs.pop("port", None)
        kwargs["connection_class"] = aio.UnixDomainSocketConnection
    elif issubclass(pool.connection_class, SSLConnection):
        kwargs["connection_class"] = aio.SSLConnection
    size = getattr(pool, "max_connections", None)
    if not size or size > 10_000:
        size = ASYNC_POOL_SIZE
    blocking = aio.BlockingConnectionPool(max_connections=size, timeout=ASYNC_POOL_WAIT, **kwargs)
    return aioredis.Redis(connection_pool=blocking)


def _async_cluster_like(client: Any) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    kwargs = portable(client.nodes_manager.connection_kwargs)
    kwargs.pop("host", None), kwargs.pop("port", None), kwargs.pop("db", None)
    ssl = any(k.startswith("ssl_") for k in kwargs)
    nodes = [ClusterNode(node.host, node.port) for node in client.get_primaries()]
    return RedisCluster(startup_nodes=nodes, ssl=ssl, **kwargs)


def _async_sentinel_like(pool: Any, kwargs: dict[str, Any]) -> Any:
    from redis.asyncio.sentinel import Sentinel

    sentinels, sentinel_kwargs = [], {}
    for sentinel in pool.sentinel_manager.sentinels:
        node = sentinel.connection_pool.connection_kwargs
        sentinels.append((node["host"], node["port"]))
        sentinel_kwargs = portable(node)
    sentinel_kwargs.pop("host", None), sentinel_kwargs.pop("port", None)
    kwargs.pop("host", None), kwargs.pop("port", None)
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **kwargs)
    return manager.master_for(pool.service_name)
