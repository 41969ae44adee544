"""``manage.py check`` catches misconfiguration before the first request does.

As django-ratelimit refuses caches that cannot count atomically, we refuse a cache
alias that is not django-redis (the ledger needs Lua scripts), and settings values
that would only fail at request time.
"""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from llm_quota.conf import DEFAULTS, quota_settings


def _is_limit(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    errors: list[Any] = []
    user = getattr(settings, "LLM_QUOTA", {}) or {}
    if not isinstance(user, dict):
        return [Error("LLM_QUOTA must be a dict.", id="llm_quota.E001")]
    for name in user:
        if name not in DEFAULTS:
            errors.append(Warning(f"LLM_QUOTA has an unknown key {name!r}.", id="llm_quota.W001"))
    errors += _check_redis()
    if quota_settings.UNKNOWN_MODEL not in ("reject", "default"):
        errors.append(
            Error(
                f"LLM_QUOTA['UNKNOWN_MODEL'] is {quota_settings.UNKNOWN_MODEL!r}; "
                "use 'reject' or 'default'.",
                id="llm_quota.E004",
            )
        )
    try:
        ZoneInfo(str(quota_settings.PERIOD_TIMEZONE))
    except (ZoneInfoNotFoundError, ValueError):
        errors.append(
            Error(
                f"LLM_QUOTA['PERIOD_TIMEZONE'] {quota_settings.PERIOD_TIMEZONE!r} is not a "
                "known time zone.",
                id="llm_quota.E005",
            )
        )
    ttl = quota_settings.RESERVATION_TTL
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl < 60:
        errors.append(
            Error(
                "LLM_QUOTA['RESERVATION_TTL'] must be at least 60 seconds: a shorter lease "
                "expires under calls still running and lets them overspend.",
                id="llm_quota.E006",
            )
        )
    for name in ("GLOBAL_TOKENS_PER_DAY", "GLOBAL_TOKENS_PER_MONTH"):
        if not _is_limit(getattr(quota_settings, name)):
            errors.append(
                Error(
                    f"LLM_QUOTA[{name!r}] must be a positive integer or None.", id="llm_quota.E007"
                )
            )
    interval = quota_settings.SNAPSHOT_INTERVAL
    if not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0:
        errors.append(
            Error(
                "LLM_QUOTA['SNAPSHOT_INTERVAL'] must be a positive number of seconds.",
                id="llm_quota.E008",
            )
        )
    try:
        from llm_quota.ledger.keys import prefix

        prefix(str(quota_settings.KEY_PREFIX))
    except ValueError:
        errors.append(
            Error(
                "LLM_QUOTA['KEY_PREFIX'] may hold only letters, digits and ._- (1-32).",
                id="llm_quota.E009",
            )
        )
    errors += _check_alert_settings()
    errors += _check_outage_settings()
    return errors


def _check_alert_settings() -> list[Any]:
    errors: list[Any] = []
    url = quota_settings.ALERT_WEBHOOK_URL
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        errors.append(
            Error(
                "LLM_QUOTA['ALERT_WEBHOOK_URL'] must be an http(s) URL or None.",
                id="llm_quota.E020",
            )
        )
    timeout = quota_settings.ALERT_WEBHOOK_TIMEOUT
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        errors.append(
            Error(
                "LLM_QUOTA['ALERT_WEBHOOK_TIMEOUT'] must be a positive number of seconds.",
                id="llm_quota.E021",
            )
        )
    return errors


def _check_outage_settings() -> list[Any]:
    """What a Redis outage costs each request rests on these (see ``outage.py``)."""
    errors: list[Any] = []
    cooldown = quota_settings.BREAKER_COOLDOWN
    if not isinstance(cooldown, int | float) or isinstance(cooldown, bool) or cooldown <= 0:
        errors.append(
            Error(
                "LLM_QUOTA['BREAKER_COOLDOWN'] must be a positive number of seconds.",
                id="llm_quota.E030",
            )
        )
    divisor = quota_settings.FAIL_OPEN_DIVISOR
    if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < 1:
        errors.append(
            Error(
                "LLM_QUOTA['FAIL_OPEN_DIVISOR'] must be a positive integer (the number of "
                "processes serving requests).",
                id="llm_quota.E031",
            )
        )
    cache = settings.CACHES.get(quota_settings.REDIS_CACHE_ALIAS) or {}
    options = cache.get("OPTIONS") or {}
    if (
        not quota_settings.REDIS_CLUSTER_URL
        and str(cache.get("BACKEND", "")).startswith("django_redis.")
        and not (options.get("SOCKET_TIMEOUT") and options.get("SOCKET_CONNECT_TIMEOUT"))
    ):
        errors.append(
            Warning(
                "The quota cache has no SOCKET_TIMEOUT/SOCKET_CONNECT_TIMEOUT: a Redis that "
                "stops answering holds requests until the OS gives up, before the circuit "
                "breaker can open.",
                hint="Set OPTIONS {'SOCKET_CONNECT_TIMEOUT': 1, 'SOCKET_TIMEOUT': 1}.",
                id="llm_quota.W030",
            )
        )
    return errors


def _check_redis() -> list[Any]:
    """The ledger needs Lua scripts on a real Redis: a django-redis cache, or a cluster."""
    url = quota_settings.REDIS_CLUSTER_URL
    if url:
        return _check_cluster_url(str(url))
    errors: list[Any] = []
    alias = quota_settings.REDIS_CACHE_ALIAS
    cache = settings.CACHES.get(alias)
    if cache is None:
        errors.append(
            Error(
                f"LLM_QUOTA['REDIS_CACHE_ALIAS'] is {alias!r}, but CACHES has no such alias.",
                hint="Add a django_redis.cache.RedisCache entry under that alias.",
                id="llm_quota.E002",
            )
        )
    elif not str(cache.get("BACKEND", "")).startswith("django_redis."):
        errors.append(
            Error(
                f"CACHES[{alias!r}] is {cache.get('BACKEND')}, not django-redis: the quota "
                "ledger runs Lua scripts on Redis and cannot count atomically anywhere else.",
                hint="Use BACKEND 'django_redis.cache.RedisCache'.",
                id="llm_quota.E003",
            )
        )
    return errors


def _check_cluster_url(url: str) -> list[Any]:
    from urllib.parse import urlsplit

    from llm_quota.ledger.connections import CLUSTER_SCHEMES, cluster_nodes

    try:
        first, _ = cluster_nodes(url)
        ok = urlsplit(url).scheme in (*CLUSTER_SCHEMES, "redis", "rediss")
        ok = ok and bool(urlsplit(first).hostname) and urlsplit(first).port is not None
    except ValueError:
        ok = False
    if ok:
        return []
    return [
        Error(
            f"LLM_QUOTA['REDIS_CLUSTER_URL'] {url[:80]!r} is not a cluster URL.",
            hint="Use redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS).",
            id="llm_quota.E014",
        )
    ]


@register(Tags.database)
def check_tiers(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Any]:
    """With ``--database``, warn when no tier would apply to a user without a quota."""
    if not databases:
        return []
    from django.db import DatabaseError

    from llm_quota.models import Tier

    try:
        defaults = Tier.objects.filter(is_default=True).count()
        named = Tier.objects.filter(name=quota_settings.DEFAULT_TIER).exists()
    except DatabaseError:
        return []
    if defaults > 1:
        return [Error("More than one tier is marked default.", id="llm_quota.E010")]
    if not defaults and not named:
        return [
            Warning(
                f"No default tier (is_default, or named {quota_settings.DEFAULT_TIER!r}): "
                "users without a UserQuota are refused.",
                id="llm_quota.W002",
            )
        ]
    return []


@register(Tags.compatibility)
def check_gateway(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The middleware that ends throttled reservations, and a reachable upstream setting."""
    from django.utils.module_loading import import_string

    from llm_quota.middleware import LLMQuotaMiddleware

    errors: list[Any] = []
    installed = False
    for dotted in getattr(settings, "MIDDLEWARE", None) or []:
        try:
            installed = installed or issubclass(import_string(dotted), LLMQuotaMiddleware)
        except (ImportError, TypeError):
            continue
    if not installed:
        errors.append(
            Warning(
                "llm_quota.middleware.LLMQuotaMiddleware is not in MIDDLEWARE: reservations "
                "made by LLMQuotaThrottle in views that do not settle them stay reserved "
                "until RESERVATION_TTL, and @quota_gated views are not gated.",
                hint="Add 'llm_quota.middleware.LLMQuotaMiddleware' to MIDDLEWARE.",
                id="llm_quota.W003",
            )
        )
    base_url = quota_settings.OPENAI_BASE_URL
    if base_url:
        if not str(base_url).startswith(("http://", "https://")):
            errors.append(
                Error(
                    f"LLM_QUOTA['OPENAI_BASE_URL'] {base_url!r} is not an http(s) URL.",
                    hint="For example https://api.openai.com/v1",
                    id="llm_quota.E011",
                )
            )
        try:
            import httpx  # noqa: F401
        except ImportError:
            errors.append(
                Error(
                    "LLM_QUOTA['OPENAI_BASE_URL'] is set but httpx is not installed.",
                    hint='pip install "django-llm-quota[gateway]"',
                    id="llm_quota.E012",
                )
            )
    if not isinstance(quota_settings.ASYNC_GATEWAY, bool):
        errors.append(
            Error("LLM_QUOTA['ASYNC_GATEWAY'] must be True or False.", id="llm_quota.E015")
        )
    for name in ("UPSTREAM_CONNECT_TIMEOUT", "UPSTREAM_READ_TIMEOUT"):
        value = getattr(quota_settings, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            errors.append(
                Error(f"LLM_QUOTA[{name!r}] must be a positive number of seconds.",
                      id="llm_quota.E013")
            )  # fmt: skip
    return errors
