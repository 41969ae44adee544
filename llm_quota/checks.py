"""``manage.py check`` catches misconfiguration before the first request does.

Each setting's value is held to the rule declared with it in ``conf.py``. Written out
here are the checks a single value cannot answer: as django-ratelimit refuses caches
that cannot count atomically, we refuse a cache alias that is not django-redis (the
ledger needs Lua scripts); and the middleware, the default tier, the cluster URL, the
gateway's upstream and the token endpoint's rate are judged against the project.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from llm_quota.conf import SETTINGS, quota_settings


def _declared(area: str) -> list[Any]:
    """Each declared setting of ``area`` whose value breaks its rule, as an Error."""
    errors: list[Any] = []
    for setting in SETTINGS:
        if setting.area != area or setting.rule is None:
            continue
        value = getattr(quota_settings, setting.name)
        if not setting.rule.accepts(value):
            message = setting.rule.says.format(value=value)
            errors.append(
                Error(
                    f"LLM_QUOTA[{setting.name!r}] {message}",
                    hint=setting.rule.hint or None,
                    id=setting.check_id,
                )
            )
    return errors


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """Every quota setting by its declared rule, then what only the project can tell."""
    user = getattr(settings, "LLM_QUOTA", {}) or {}
    if not isinstance(user, dict):
        return [Error("LLM_QUOTA must be a dict.", id="llm_quota.E001")]
    errors: list[Any] = []
    declared = {setting.name: setting for setting in SETTINGS}
    for name in user:
        if name not in declared:
            errors.append(Warning(f"LLM_QUOTA has an unknown key {name!r}.", id="llm_quota.W001"))
        elif declared[name].moved_to:
            errors.append(
                Warning(
                    f"LLM_QUOTA[{name!r}] has moved to {declared[name].moved_to}. It is "
                    "honoured until the next release.",
                    id="llm_quota.W050",
                )
            )
    errors += _declared("quota")
    errors += _check_redis()
    errors += _check_key_prefix()
    errors += _check_socket_timeouts()
    return errors


def _check_key_prefix() -> list[Any]:
    """The key builder owns the rule for the prefix of every key."""
    from llm_quota.ledger.keys import prefix

    try:
        prefix(str(quota_settings.KEY_PREFIX))
    except ValueError:
        return [
            Error(
                "LLM_QUOTA['KEY_PREFIX'] may hold only letters, digits and ._- (1-32).",
                id="llm_quota.E009",
            )
        ]
    return []


def _check_socket_timeouts() -> list[Any]:
    """Without them a Redis that stops answering holds requests before the breaker opens."""
    cache = settings.CACHES.get(quota_settings.REDIS_CACHE_ALIAS) or {}
    options = cache.get("OPTIONS") or {}
    if (
        not quota_settings.REDIS_CLUSTER_URL
        and str(cache.get("BACKEND", "")).startswith("django_redis.")
        and not (options.get("SOCKET_TIMEOUT") and options.get("SOCKET_CONNECT_TIMEOUT"))
    ):
        return [
            Warning(
                "The quota cache has no SOCKET_TIMEOUT/SOCKET_CONNECT_TIMEOUT: a Redis that "
                "stops answering holds requests until the OS gives up, before the circuit "
                "breaker can open.",
                hint="Set OPTIONS {'SOCKET_CONNECT_TIMEOUT': 1, 'SOCKET_TIMEOUT': 1}.",
                id="llm_quota.W030",
            )
        ]
    return []


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


@register(Tags.models)
def check_tiers(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Any]:
    """Warn when no tier would apply to a user without a quota (each is refused with a
    403), and when ``DEFAULT_TIER`` is shadowed by a tier marked default.

    Runs on a plain ``check``, not only with ``--database``: a site with no tier refuses
    everyone. It says nothing while the table does not exist yet (``check`` and
    ``migrate`` before the first migration) or the database cannot be reached: those
    are other commands' business, and a failing query must not break them.
    """
    from django.db import DatabaseError, connections, router

    from llm_quota.models import Tier

    alias = router.db_for_read(Tier)
    if databases and alias not in databases:
        return []
    connection = connections[alias]
    fallback = quota_settings.DEFAULT_TIER
    try:
        with connection.cursor() as cursor:
            if Tier._meta.db_table not in connection.introspection.table_names(cursor):
                return []
        tiers = Tier.objects.using(alias)
        defaults = list(tiers.filter(is_default=True).values_list("name", flat=True))
        named = tiers.filter(name=fallback).exists()
    except DatabaseError:
        return []
    if len(defaults) > 1:
        return [Error("More than one tier is marked default.", id="llm_quota.E010")]
    if not defaults and not named:
        return [
            Warning(
                f"No default tier (is_default, or named {fallback!r}): users without a "
                "UserQuota are refused (403).",
                hint="Create a tier in the admin (the first one becomes the default), "
                "or run the demo's seed.",
                id="llm_quota.W002",
            )
        ]
    if defaults and named and defaults[0] != fallback:
        return [
            Warning(
                f"DEFAULT_TIER names {fallback!r}, but tier {defaults[0]!r} is marked "
                "default and is the one users without a UserQuota get.",
                hint=f"Untick Default on {defaults[0]!r} to let DEFAULT_TIER apply, "
                "or set DEFAULT_TIER to it.",
                id="llm_quota.W020",
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
                "until RESERVATION_TTL (the gateway and @quota_gated views end their own).",
                hint="Add 'llm_quota.middleware.LLMQuotaMiddleware' to MIDDLEWARE.",
                id="llm_quota.W003",
            )
        )
    errors += _declared("gateway")
    if quota_settings.OPENAI_BASE_URL:
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
    errors += _check_upstream_chosen()
    return errors


def _check_upstream_chosen() -> list[Any]:
    """A mounted gateway needs an upstream chosen on purpose: it never falls back to the
    fake provider, which would serve invented answers as if they were real."""
    if quota_settings.OPENAI_BASE_URL or quota_settings.UPSTREAM:
        return []
    if not _gateway_mounted():
        return []
    return [
        Error(
            "The gateway is mounted but has no upstream: neither "
            "LLM_QUOTA['OPENAI_BASE_URL'] nor LLM_QUOTA['UPSTREAM'] is set.",
            hint="Set OPENAI_BASE_URL to an OpenAI-compatible server, or, for a demo or "
            "tests, UPSTREAM = 'llm_quota.testing.fake_provider.FakeProvider'.",
            id="llm_quota.E017",
        )
    ]


def _gateway_mounted() -> bool:
    """Whether any URL pattern serves a chat view, under any prefix or namespace, and
    whether it was included with ``llm_quota.urls`` or routed by hand."""
    from django.urls import URLPattern, URLResolver, get_resolver

    from llm_quota.gateway.async_views import AsyncChatCompletionsView
    from llm_quota.gateway.views import ChatCompletionsView

    chat_views = (ChatCompletionsView, AsyncChatCompletionsView)
    pending = list(get_resolver().url_patterns)
    while pending:
        pattern = pending.pop()
        if isinstance(pattern, URLResolver):
            pending.extend(pattern.url_patterns)
        elif isinstance(pattern, URLPattern):
            view_class = getattr(pattern.callback, "view_class", None)
            if isinstance(view_class, type) and issubclass(view_class, chat_views):
                return True
    return False


@register(Tags.compatibility)
def check_token_endpoint(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The token endpoint counts requests in Redis's sliding minute, so its DRF rate must
    be a rate per minute."""
    from django.core.exceptions import ImproperlyConfigured

    from llm_quota.contrib.jwt.throttling import TokenEndpointThrottle

    try:
        TokenEndpointThrottle()  # reads and parses the rate
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="llm_quota.E050")]
    return []
