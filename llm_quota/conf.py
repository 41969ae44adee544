"""The one reader of the ``LLM_QUOTA`` setting.

Modelled on DRF's ``api_settings``: attribute access returns the user's value or the
documented default, and the cache is dropped when a test overrides the setting.
Validation lives in ``checks.py`` so that misconfiguration shows up in
``manage.py check`` rather than on the first request.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    "REDIS_CACHE_ALIAS": "default",
    "KEY_PREFIX": "llmq",
    "FAIL_OPEN": True,
    "DEFAULT_TIER": "free",
    "UNKNOWN_MODEL": "reject",
    "CLAMP_MAX_TOKENS": True,
    # Below this many output tokens a clamped request is not worth sending.
    "MIN_OUTPUT_TOKENS": 16,
    "RESERVATION_TTL": 600,
    "SNAPSHOT_INTERVAL": 60,
    "PERIOD_TIMEZONE": "UTC",
    "SCOPE_CLAIM": "scope",
    "CHAT_SCOPE": "llm:chat",
    "USAGE_SCOPE": "usage:read",
    "BASE_TOKEN_USD_PER_MILLION": Decimal("2.50"),
    "GLOBAL_TOKENS_PER_DAY": None,
    "GLOBAL_TOKENS_PER_MONTH": None,
    # Seconds a process may serve tier, quota and price rows from memory before
    # reading them again. Saves reach every process at once (config_broadcast.py):
    # this only bounds how stale a process cut off from Redis pub/sub can get.
    "CONFIG_CACHE_SECONDS": 30.0,
    # Redis Cluster: "redis+cluster://host:port[,host:port...]" makes the ledger use
    # redis-py's RedisCluster instead of the REDIS_CACHE_ALIAS client (django-redis
    # has no cluster client).
    "REDIS_CLUSTER_URL": None,
    # Requests per minute per client address to the token endpoint (password
    # guessing); None or 0 turns the limit off.
    "TOKEN_REQUESTS_PER_MINUTE": 20,
    # The gateway's upstream (contract section 2): an OpenAI-compatible base URL such
    # as "https://api.openai.com/v1" and its key. No URL: the built-in fake provider.
    "OPENAI_BASE_URL": None,
    "OPENAI_API_KEY": None,
    "UPSTREAM": None,
    # Seconds the gateway waits for the upstream to connect, and between two reads.
    "UPSTREAM_CONNECT_TIMEOUT": 10.0,
    "UPSTREAM_READ_TIMEOUT": 600.0,
    # Serve /v1/chat/completions with the async view (async_gateway.py): for ASGI
    # servers such as uvicorn. Read when the URLs are loaded.
    "ASYNC_GATEWAY": False,
    # Alerts (soft limit crossed, budget exhausted) are also POSTed here as JSON, by
    # a Celery task so the request never waits on it; None sends only the signals.
    "ALERT_WEBHOOK_URL": None,
    # Seconds the webhook task waits for the receiver before retrying.
    "ALERT_WEBHOOK_TIMEOUT": 5.0,
    # Redis outage (outage.py): seconds the circuit breaker keeps requests off Redis
    # after a connection error or timeout, before one request per process probes it.
    "BREAKER_COOLDOWN": 2.0,
    # FAIL_OPEN admits each process a 1/FAIL_OPEN_DIVISOR share of the tier's
    # per-minute limits: set it to the number of processes serving requests.
    "FAIL_OPEN_DIVISOR": 4,
}


class QuotaSettings:
    """Each setting is read once, then kept as an instance attribute: the gate reads a
    dozen per request, and a plain attribute costs less than ``__getattr__`` (which
    Python calls only on a miss). ``reload`` drops them all."""

    @property
    def user_settings(self) -> dict[str, Any]:
        return getattr(settings, "LLM_QUOTA", None) or {}

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Invalid LLM_QUOTA setting: {name!r}")
        value = self.user_settings.get(name, DEFAULTS[name])
        setattr(self, name, value)
        return value

    def reload(self) -> None:
        self.__dict__.clear()


quota_settings = QuotaSettings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    """Drop the cached values; each owner of state built from them (the ledger, the
    connections, the outage state, the config cache) resets its own on the same signal."""
    if setting == "LLM_QUOTA":
        quota_settings.reload()


setting_changed.connect(_reload)
