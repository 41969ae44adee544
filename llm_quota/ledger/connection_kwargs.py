"""The connection settings one redis-py client can hand to another: the async twin
(``connections``) and the Sentinel watcher's own connections (``sentinel_watch``)."""

from __future__ import annotations

from typing import Any

#: Connection settings that mean the same to redis-py's sync and asyncio connections.
_PORTABLE = frozenset(
    {
        "host", "port", "path", "db", "username", "password", "client_name",
        "socket_timeout", "socket_connect_timeout", "socket_keepalive",
        "socket_keepalive_options", "retry_on_timeout", "health_check_interval",
        "encoding", "encoding_errors", "decode_responses", "protocol",
        "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data",
        "ssl_ca_path", "ssl_check_hostname", "ssl_password",
    }
)  # fmt: skip


def portable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` (a pool's ``connection_kwargs``) less what belongs to that pool."""
    return {k: v for k, v in kwargs.items() if k in _PORTABLE and v is not None}
