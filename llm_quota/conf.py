"""The one reader of the ``LLM_QUOTA`` setting, and the declaration of every key in it.

Each key is declared once below: its default, the rule a value must follow (checked by
``manage.py check``, never at request time) and its one-line doc; the docs' settings
page (``docs/pages/settings.md``) is built from these declarations by ``docs/hooks.py``.
Reading works like DRF's ``api_settings``: the user's value or the default, dropped
when a test overrides the setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``accepts`` decides, ``says`` finishes the system check's
    message after ``LLM_QUOTA['NAME']`` (``{value!r}`` names the value given)."""

    accepts: Callable[[Any], bool]
    says: str
    hint: str = ""


@dataclass(frozen=True)
class Setting:
    """One key of ``LLM_QUOTA``. ``rule`` is None where the value can only be judged
    against the project (a cache alias, the key builder, the cluster URL parser): those
    checks are written out in ``checks.py``. ``area`` says which system check reports it."""

    name: str
    default: Any
    doc: str
    rule: Rule | None = None
    check_id: str = ""
    area: str = "quota"
    #: Where a key that left ``LLM_QUOTA`` now lives; set, it is honoured with a warning.
    moved_to: str = ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _is_positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_limit(value: Any) -> bool:
    return value is None or _is_positive_int(value)


def _is_amount(value: Any) -> bool:
    """A number or its string (``Decimal("2.50")``, ``"2.50"``, ``2.5``) above zero."""
    if isinstance(value, bool):
        return False
    try:
        return Decimal(str(value)) > 0
    except InvalidOperation:
        return False


def _is_time_zone(value: Any) -> bool:
    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _is_http_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _is_class_path(value: Any) -> bool:
    if value is None:
        return True
    try:
        return isinstance(value, str) and isinstance(import_string(value), type)
    except ImportError:
        return False


FLAG = Rule(lambda v: isinstance(v, bool), "must be True or False.")
NAME = Rule(lambda v: isinstance(v, str), "must be a string.")
SECONDS = Rule(_is_positive_number, "must be a positive number of seconds.")
LIMIT = Rule(_is_limit, "must be a positive integer or None.")

SETTINGS: tuple[Setting, ...] = (
    Setting("REDIS_CACHE_ALIAS", "default", "django-redis cache whose raw client the ledger uses"),
    Setting("KEY_PREFIX", "llmq", "prefix of every Redis key"),
    Setting(
        "FAIL_OPEN",
        True,
        "Redis down: admit unmetered (logged CRITICAL once per outage) or answer 503",
        FLAG,
        "llm_quota.E040",
    ),
    Setting(
        "DEFAULT_TIER",
        "free",
        "tier for users without a `UserQuota` when none is `is_default`",
        NAME,
        "llm_quota.E041",
    ),
    Setting(
        "UNKNOWN_MODEL",
        "reject",
        '`"reject"` a model with no price row (400), or `"default"`: price it by the `*` row',
        Rule(lambda v: v in ("reject", "default"), "is {value!r}; use 'reject' or 'default'."),
        "llm_quota.E004",
    ),
    Setting(
        "CLAMP_MAX_TOKENS",
        True,
        "lower `max_tokens` to what fits instead of refusing",
        FLAG,
        "llm_quota.E040",
    ),
    Setting(
        "MIN_OUTPUT_TOKENS",
        16,
        "a clamp below this many output tokens refuses instead",
        Rule(_is_positive_int, "must be a positive integer."),
        "llm_quota.E042",
    ),
    Setting(
        "RESERVATION_TTL",
        600,
        "seconds until an unsettled reservation expires; a call still running renews it "
        "every third of this (at least 60)",
        Rule(
            lambda v: _is_number(v) and v >= 60,
            "must be at least 60 seconds: live calls renew their lease every third of it, "
            "and a shorter lease leaves no room for a renewal that comes late.",
        ),
        "llm_quota.E006",
    ),
    Setting(
        "LEASE_MAX_SECONDS",
        None,
        "longest a call's reservation is renewed: past it a call still unfinished lets its "
        "lease expire, giving back its slot and estimate (its settle, if it comes, charges "
        "in full); None (the contract's default) renews for as long as the call lives",
        Rule(
            lambda v: v is None or (_is_number(v) and v > 0),
            "must be a positive number of seconds or None.",
        ),
        "llm_quota.E062",
    ),
    Setting(
        "SNAPSHOT_INTERVAL",
        60,
        "seconds between usage snapshots to the database",
        SECONDS,
        "llm_quota.E008",
    ),
    Setting(
        "PERIOD_TIMEZONE",
        "UTC",
        "time zone of the calendar day and month",
        Rule(_is_time_zone, "{value!r} is not a known time zone."),
        "llm_quota.E005",
    ),
    Setting(
        "SCOPE_CLAIM",
        "scope",
        "the JWT claim that holds the caller's scopes",
        NAME,
        "llm_quota.E041",
    ),
    Setting("CHAT_SCOPE", "llm:chat", "the scope an LLM call needs", NAME, "llm_quota.E041"),
    Setting("USAGE_SCOPE", "usage:read", "the scope the usage API needs", NAME, "llm_quota.E041"),
    Setting(
        "BASE_TOKEN_USD_PER_MILLION",
        Decimal("2.50"),
        "dollars per million base tokens, for the dollar figures in reports",
        Rule(_is_amount, "must be a positive number."),
        "llm_quota.E043",
    ),
    Setting(
        "GLOBAL_TOKENS_PER_DAY",
        None,
        "cap on the base tokens of all users together per day",
        LIMIT,
        "llm_quota.E007",
    ),
    Setting(
        "GLOBAL_TOKENS_PER_MONTH",
        None,
        "cap on the base tokens of all users together per month",
        LIMIT,
        "llm_quota.E007",
    ),
    Setting(
        "MODEL_NAMES_PER_MONTH",
        32,
        "distinct model names a user's month is recorded under; past them, a name only a "
        "pattern price row matches is recorded under that pattern (totals stay exact)",
        Rule(_is_positive_int, "must be a positive integer."),
        "llm_quota.E045",
    ),
    Setting(
        "CONFIG_CACHE_SECONDS",
        30.0,
        "longest a process serves a tier, quota or price from memory; edits are "
        "broadcast at once, this only bounds a process cut off from Redis pub/sub",
        Rule(lambda v: _is_number(v) and v >= 0, "must be a number of seconds, 0 or more."),
        "llm_quota.E044",
    ),
    Setting(
        "REDIS_CLUSTER_URL",
        None,
        "`redis+cluster://host:port[,host:port...]`: count on a Redis Cluster (redis-py's "
        "`RedisCluster`) instead of the `REDIS_CACHE_ALIAS` client",
    ),
    Setting(
        "UPSTREAM",
        None,
        "dotted path of the gateway's upstream class; `None`: the OpenAI-compatible "
        "server at `OPENAI_BASE_URL` (the demo opts into "
        "`llm_quota.testing.fake_provider.FakeProvider`)",
        Rule(_is_class_path, "{value!r} is not an importable class."),
        "llm_quota.E016",
        area="gateway",
    ),
    Setting(
        "OPENAI_BASE_URL",
        None,
        "the gateway's OpenAI-compatible upstream (`.../v1`, such as `https://api.openai.com/v1`)",
        Rule(
            lambda v: not v or _is_http_url(v),
            "{value!r} is not an http(s) URL.",
            hint="For example https://api.openai.com/v1",
        ),
        "llm_quota.E011",
        area="gateway",
    ),
    Setting(
        "OPENAI_API_KEY",
        None,
        "the key sent to `OPENAI_BASE_URL`",
        Rule(lambda v: v is None or isinstance(v, str), "must be a string or None."),
        "llm_quota.E018",
        area="gateway",
    ),
    Setting(
        "ANTHROPIC_BASE_URL",
        None,
        "where `/v1/messages` goes (`https://api.anthropic.com/v1`), with "
        "`ANTHROPIC_API_KEY` as `x-api-key`; `None`: `OPENAI_BASE_URL`'s `messages` (a "
        "proxy that serves both APIs)",
        Rule(
            lambda v: not v or _is_http_url(v),
            "{value!r} is not an http(s) URL.",
            hint="For example https://api.anthropic.com/v1",
        ),
        "llm_quota.E060",
        area="gateway",
    ),
    Setting(
        "ANTHROPIC_API_KEY",
        None,
        "the key sent to `ANTHROPIC_BASE_URL`",
        Rule(lambda v: v is None or isinstance(v, str), "must be a string or None."),
        "llm_quota.E061",
        area="gateway",
    ),
    Setting(
        "UPSTREAM_CONNECT_TIMEOUT",
        10.0,
        "seconds to connect to the upstream",
        SECONDS,
        "llm_quota.E013",
        area="gateway",
    ),
    Setting(
        "UPSTREAM_READ_TIMEOUT",
        600.0,
        "seconds between two reads from the upstream",
        SECONDS,
        "llm_quota.E013",
        area="gateway",
    ),
    Setting(
        "ASYNC_GATEWAY",
        False,
        "serve `/v1/chat/completions` with the async view "
        "(`llm_quota.gateway.async_views`), for ASGI servers; read when the URLs load",
        FLAG,
        "llm_quota.E015",
        area="gateway",
    ),
    Setting(
        "ALERT_WEBHOOK_URL",
        None,
        "also POST each alert as JSON here (by a Celery task)",
        Rule(lambda v: v is None or _is_http_url(v), "must be an http(s) URL or None."),
        "llm_quota.E020",
    ),
    Setting(
        "ALERT_WEBHOOK_TIMEOUT",
        5.0,
        "seconds the webhook task waits for the receiver before retrying",
        SECONDS,
        "llm_quota.E021",
    ),
    Setting(
        "BREAKER_COOLDOWN",
        2.0,
        "seconds the circuit breaker keeps requests off Redis after it failed, before "
        "one request per process probes it",
        SECONDS,
        "llm_quota.E030",
    ),
    Setting(
        "FAIL_OPEN_DIVISOR",
        4,
        "with `FAIL_OPEN`, each process admits a 1/divisor share of the tier's per-minute "
        "limits (a day or month budget spread over the minutes left in it) while Redis is "
        "down: set it to the number of processes",
        Rule(
            _is_positive_int,
            "must be a positive integer (the number of processes serving requests).",
        ),
        "llm_quota.E031",
    ),
    Setting(
        "JOURNAL_DIR",
        None,
        "directory of the outage journal files (one per process, on a disk local to the "
        "host): what could not reach Redis outlives the process that ran it. `None`: kept "
        "in memory only, lost if the process dies before Redis is back",
        Rule(
            lambda v: v is None or (isinstance(v, str | os.PathLike) and str(v) != ""),
            "must be a directory path (a string or a Path) or None.",
        ),
        "llm_quota.E032",
    ),
    Setting(
        "JOURNAL_FSYNC_INTERVAL",
        0.05,
        "longest a journal entry waits for `fsync` (seconds; 0: every entry): what a crash "
        "of the whole host may lose. A killed process loses nothing either way",
        Rule(lambda v: _is_number(v) and v >= 0, "must be a number of seconds, 0 or more."),
        "llm_quota.E032",
    ),
    Setting(
        "TOKEN_REQUESTS_PER_MINUTE",
        None,
        'deprecated: set `REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["llm_quota_token"]`; '
        "honoured when set, until the next release",
        Rule(
            lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
            "must be a whole number of requests, 0 or more, or None.",
        ),
        "llm_quota.E051",
        moved_to='REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["llm_quota_token"], as a DRF '
        'rate such as "20/minute"',
    ),
)

#: Each key's default, for readers that want them all at once.
DEFAULTS: dict[str, Any] = {setting.name: setting.default for setting in SETTINGS}


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

    def is_set(self, name: str) -> bool:
        """Whether the project gave ``name`` a value (a default is not one)."""
        return name in self.user_settings

    def reload(self) -> None:
        self.__dict__.clear()


quota_settings = QuotaSettings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    """Drop the cached values; each owner of state built from them (the ledger, the
    connections, the outage state, the config cache) resets its own on the same signal."""
    if setting == "LLM_QUOTA":
        quota_settings.reload()


setting_changed.connect(_reload)


def reset_on_change(reset: Callable[[], None]) -> Callable[[], None]:
    """Decorator: call ``reset`` whenever ``LLM_QUOTA`` changes (a test's
    ``override_settings``). What a module built from the settings, it drops itself."""

    def receiver(*, setting: str, **kwargs: Any) -> None:
        if setting == "LLM_QUOTA":
            reset()

    setting_changed.connect(receiver, weak=False)
    return reset
