"""Tiers, model prices, per-user quotas and usage snapshots: what the admin manages.

A Tier or ModelPrice edit takes effect on the next request in every process (the
config cache is dropped on save, see ``ledger/config_broadcast.py``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise  # a lazy translation or a str

#: The limits a Tier sets and a UserQuota may override, field for field.
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "max_concurrent_requests",
    "max_tokens_per_request",
)


def _limit_field(verbose_name: StrOrPromise, help_text: str) -> models.PositiveBigIntegerField:
    return models.PositiveBigIntegerField(
        verbose_name,
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text=help_text + " Empty means unlimited.",
    )


#: A UserQuota override of this value lifts that limit for the user (empty inherits).
UNLIMITED = 0


def _override_field(verbose_name: StrOrPromise) -> models.PositiveBigIntegerField:
    """A UserQuota override: empty inherits the tier's value, 0 (``UNLIMITED``) lifts
    the limit for this user alone, any other value replaces the tier's."""
    return models.PositiveBigIntegerField(
        verbose_name,
        null=True,
        blank=True,
        help_text=_(
            "Empty: the tier's value. 0: unlimited for this user. Else overrides the tier."
        ),
    )


def overridden(tier_value: int | None, override: int | None) -> int | None:
    """The limit in effect for a user: the tier's unless overridden (None: unlimited)."""
    if override is None:
        return tier_value
    return None if override == UNLIMITED else override


def _multiplier_field(verbose_name: StrOrPromise, **options: Any) -> models.DecimalField:
    """Base tokens per token, to the six places ``accounting.to_micro`` converts exactly."""
    return models.DecimalField(
        verbose_name,
        max_digits=12,
        decimal_places=6,
        validators=[MinValueValidator(Decimal("0"))],
        **options,
    )


class SoftLimitMode(models.TextChoices):
    """What a tier does past its soft limit (contract §11)."""

    ALERT = "alert", _("alert")
    SLOW = "slow", _("slow down")


class Tier(models.Model):
    name = models.SlugField(_("name"), max_length=64, unique=True)
    requests_per_minute = _limit_field(_("requests per minute"), "Sliding 60-second window.")
    tokens_per_minute = _limit_field(_("tokens per minute"), "Base tokens, sliding 60 s.")
    tokens_per_day = _limit_field(_("tokens per day"), "Base tokens, calendar day.")
    tokens_per_month = _limit_field(_("tokens per month"), "Base tokens, calendar month.")
    max_concurrent_requests = _limit_field(_("max concurrent requests"), "Calls in flight.")
    max_tokens_per_request = _limit_field(
        _("max tokens per request"), "Base tokens one request may reserve."
    )
    allowed_models = models.TextField(
        _("allowed models"),
        blank=True,
        help_text=_("One model name or fnmatch pattern per line; empty allows every model."),
    )
    scopes = models.CharField(
        _("scopes"),
        max_length=255,
        default="llm:chat usage:read",
        blank=True,
        help_text=_("Space-separated scopes put into this tier's access tokens."),
    )
    soft_limit_percent = models.PositiveSmallIntegerField(
        _("soft limit percent"), default=80, validators=[MinValueValidator(1)]
    )
    soft_limit_mode = models.CharField(
        _("past the soft limit"),
        max_length=8,
        choices=SoftLimitMode.choices,
        default=SoftLimitMode.ALERT,
        help_text=_(
            "Alert: signal and webhook only. Slow: also shrink the request and token rates "
            "as the rest of the month's budget runs out, so a loop slows before the hard stop."
        ),
    )
    # The burn-rate breaker (contract §11, ledger/lua/burn.lua). The defaults suit a new
    # user with no baseline yet: only the floor applies until a week of use has taught
    # one, and a person's busiest minute is rarely a tenth of it.
    burn_multiplier = models.DecimalField(
        _("burn-rate multiplier"),
        max_digits=6,
        decimal_places=2,
        null=True,
        blank=True,
        default=Decimal("10"),
        validators=[MinValueValidator(Decimal("1"))],
        help_text=_(
            "Pause a caller whose last minute's spend exceeds this many times their "
            "baseline (their busiest minute of recent days). Empty turns the breaker off."
        ),
    )
    burn_floor = models.PositiveBigIntegerField(
        _("burn-rate floor"),
        null=True,
        blank=True,
        default=100_000,
        validators=[MinValueValidator(1)],
        help_text=_(
            "Base tokens a minute below which the breaker never trips. Empty turns it off."
        ),
    )
    burn_pause_seconds = models.PositiveIntegerField(
        _("burn-rate pause (seconds)"),
        null=True,
        blank=True,
        default=900,
        validators=[MinValueValidator(1)],
        help_text=_("How long a tripped caller is paused. Empty turns the breaker off."),
    )
    upgrade_to = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("upgrade to"),
    )
    upgrade_url = models.URLField(_("upgrade URL"), blank=True)
    is_default = models.BooleanField(
        _("default tier"),
        default=False,
        help_text=_(
            "Users without a user quota get this tier. With none ticked, the tier named "
            "by the DEFAULT_TIER setting. The first tier becomes the default."
        ),
    )

    class Meta:
        ordering = ["name"]
        verbose_name = _("tier")
        verbose_name_plural = _("tiers")

    def __str__(self) -> str:
        return self.name

    @property
    def model_patterns(self) -> list[str]:
        return [line.strip() for line in self.allowed_models.splitlines() if line.strip()]

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split()

    def clean(self) -> None:
        for pattern in self.model_patterns:
            try:
                re.compile(fnmatch.translate(pattern))
            except re.error as exc:
                raise ValidationError({"allowed_models": f"{pattern!r}: {exc}"}) from exc
        if self.upgrade_to_id is not None and self.upgrade_to_id == self.pk:
            raise ValidationError({"upgrade_to": _("A tier cannot upgrade to itself.")})
        if self.soft_limit_mode == SoftLimitMode.SLOW and (
            self.tokens_per_month is None
            or (self.requests_per_minute is None and self.tokens_per_minute is None)
        ):
            # Slowing down shrinks the rates by what is left of the month's budget:
            # without a budget or a rate there is nothing to shrink.
            raise ValidationError(
                {
                    "soft_limit_mode": _(
                        "Slowing down needs a monthly budget (tokens per month) and a rate "
                        "to shrink (requests or tokens per minute)."
                    )
                }
            )


#: What ``ModelPrice.output_cap_field`` may say (blank: by the model's name).
OUTPUT_CAP_FIELDS = [
    ("max_tokens", "max_tokens"),
    ("max_completion_tokens", "max_completion_tokens"),
]


class ModelPrice(models.Model):
    model = models.CharField(
        _("model"),
        max_length=128,
        unique=True,
        help_text=_("Exact model name or fnmatch pattern; '*' is the fallback."),
    )
    input_multiplier = _multiplier_field(
        _("input multiplier"), default=Decimal("1"), help_text=_("Base tokens per input token.")
    )
    output_multiplier = _multiplier_field(
        _("output multiplier"), default=Decimal("1"), help_text=_("Base tokens per output token.")
    )
    cached_input_multiplier = _multiplier_field(_("cached input multiplier"), null=True, blank=True)
    encoding = models.CharField(
        _("encoding"),
        max_length=64,
        blank=True,
        help_text=_("tiktoken encoding; empty chooses one from the model name."),
    )
    default_max_output_tokens = models.PositiveIntegerField(
        _("default max output tokens"), default=4096, validators=[MinValueValidator(1)]
    )
    context_window = models.PositiveIntegerField(
        _("context window"), null=True, blank=True, validators=[MinValueValidator(1)]
    )
    output_cap_field = models.CharField(
        _("output cap field"),
        max_length=32,
        blank=True,
        default="",
        choices=OUTPUT_CAP_FIELDS,
        help_text=_(
            "The request field that caps the output upstream; empty: max_completion_tokens "
            "for the o-series and gpt-5, else max_tokens."
        ),
    )
    enabled = models.BooleanField(_("enabled"), default=True)

    class Meta:
        ordering = ["model"]
        verbose_name = _("model price")
        verbose_name_plural = _("model prices")

    def __str__(self) -> str:
        return self.model

    @property
    def is_pattern(self) -> bool:
        return any(ch in self.model for ch in "*?[")

    def clean(self) -> None:
        try:
            re.compile(fnmatch.translate(self.model))
        except re.error as exc:  # pragma: no cover - fnmatch escapes nearly everything
            raise ValidationError({"model": str(exc)}) from exc


class UserQuota(models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_quota"
    )
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="quotas")
    requests_per_minute = _override_field(_("requests per minute"))
    tokens_per_minute = _override_field(_("tokens per minute"))
    tokens_per_day = _override_field(_("tokens per day"))
    tokens_per_month = _override_field(_("tokens per month"))
    max_concurrent_requests = _override_field(_("max concurrent requests"))
    max_tokens_per_request = _override_field(_("max tokens per request"))
    blocked = models.BooleanField(_("blocked"), default=False)

    class Meta:
        verbose_name = _("user quota")
        verbose_name_plural = _("user quotas")

    def __str__(self) -> str:
        return f"{self.user} ({self.tier})"

    @property
    def monthly_budget(self) -> int | None:
        """The ``tokens_per_month`` in effect: the override, else the tier's (None: unlimited)."""
        return overridden(self.tier.tokens_per_month, self.tokens_per_month)


class QuotaUser(get_user_model()):  # type: ignore[misc]
    """Every user, with or without a ``UserQuota``, for the admin's list of users, their
    tier and live usage: a proxy of ``AUTH_USER_MODEL`` (no table of its own).

    Its own plain manager keeps its migration the same whatever user model the project
    has (the user model's manager, ``use_in_migrations``, would be copied into it)."""

    objects: models.Manager[QuotaUser] = models.Manager()

    class Meta:
        proxy = True
        verbose_name = _("user")
        verbose_name_plural = _("users")


class UsageSnapshot(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_usage_snapshots"
    )
    period = models.DateField(_("period"), help_text=_("First day of the month."))
    model = models.CharField(_("model"), max_length=128)
    requests = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    base_tokens = models.PositiveBigIntegerField(default=0)
    generation = models.BigIntegerField(
        _("generation"), default=0,
        help_text=_("The user's counters' generation when copied: a reset starts a new "
                    "one, so Redis below this row in the same one has lost writes."),
    )  # fmt: skip
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-period", "user", "model"]
        verbose_name = _("usage snapshot")
        verbose_name_plural = _("usage snapshots")
        constraints = [
            models.UniqueConstraint(
                fields=["user", "period", "model"], name="llm_quota_snapshot_unique"
            )
        ]
        indexes = [models.Index(fields=["period", "user"])]

    def __str__(self) -> str:
        return f"{self.user} {self.period:%Y-%m} {self.model}"


class Team(models.Model):
    """Members who share a budget (contract section 10): the team's tier sets limits
    that apply to all its members' requests together, on top of each member's own."""

    slug = models.SlugField(
        _("slug"), max_length=64, unique=True,
        help_text=_("What the OpenAI-Organization header (the SDK's organization=) names."),
    )  # fmt: skip
    name = models.CharField(_("name"), max_length=100)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="teams")
    requests_per_minute = _override_field(_("requests per minute"))
    tokens_per_day = _override_field(_("tokens per day"))
    tokens_per_month = _override_field(_("tokens per month"))
    max_concurrent_requests = _override_field(_("max concurrent requests"))
    max_tokens_per_request = _override_field(_("max tokens per request"))
    blocked = models.BooleanField(_("blocked"), default=False)
    members: models.ManyToManyField[Any, Any] = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="TeamMembership", related_name="llm_teams"
    )

    class Meta:
        ordering = ["slug"]
        verbose_name = _("team")
        verbose_name_plural = _("teams")

    def __str__(self) -> str:
        return self.slug


#: What a team enforces of its tier's limits (the tokens-per-minute window is per user).
TEAM_LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "max_concurrent_requests",
    "max_tokens_per_request",
)


class TeamMembership(models.Model):
    MEMBER, ADMIN = "member", "admin"
    ROLES = [(MEMBER, _("member")), (ADMIN, _("admin"))]

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_team_memberships"
    )
    role = models.CharField(_("role"), max_length=16, choices=ROLES, default=MEMBER)

    class Meta:
        verbose_name = _("team membership")
        verbose_name_plural = _("team memberships")
        constraints = [
            models.UniqueConstraint(fields=["team", "user"], name="llm_quota_membership_unique")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


#: What every API key starts with: tells it apart from a JWT on sight.
API_KEY_PREFIX = "llmq_"
#: Random bytes in a key (contract section 9: at least 32), URL-safe base64 encoded.
API_KEY_BYTES = 32
#: Characters of the random part kept in ``ApiKey.prefix``: shown, and how a key is
#: found (48 bits, unique); the key's hash, not the prefix, is what proves it.
API_KEY_PREFIX_CHARS = 8


def hash_api_key(key: str) -> str:
    """SHA-256 of the whole key, hex. A key has 256 random bits, so a fast hash is the
    accepted practice (no password hasher: nothing to stretch, and none per request)."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(models.Model):
    """A long-lived credential for code that cannot refresh a JWT (contract section 9).

    Only the key's hash is stored; the key itself is shown once, by ``issue()``'s
    caller. A save (revocation too) is broadcast like a tier edit, so every process
    refuses a revoked key on its next request.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_api_keys"
    )
    name = models.CharField(_("name"), max_length=100)
    prefix = models.CharField(_("prefix"), max_length=32, unique=True, editable=False)
    key_hash = models.CharField(_("key hash"), max_length=64, unique=True, editable=False)
    scopes = models.CharField(
        _("scopes"),
        max_length=255,
        blank=True,
        help_text=_("Space-separated; empty: the tier's. Never more than the tier grants."),
    )
    team = models.ForeignKey(
        Team,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="api_keys",
        help_text=_("The team this key's requests are charged to; its user must be a member."),
    )
    expires_at = models.DateTimeField(_("expires at"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked at"), null=True, blank=True)
    requests_per_minute = _limit_field(_("requests per minute"), "This key's own limit.")
    tokens_per_day = _limit_field(_("tokens per day"), "Base tokens, this key's own limit.")
    tokens_per_month = _limit_field(_("tokens per month"), "Base tokens, this key's own limit.")
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)
    last_used_at = models.DateTimeField(
        _("last used at"),
        null=True,
        blank=True,
        editable=False,
        help_text=_("As of the last usage snapshot."),
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split()

    def issue(self) -> str:
        """Give this unsaved key a fresh secret; returns the plaintext, to show once."""
        random_part = secrets.token_urlsafe(API_KEY_BYTES)
        key = API_KEY_PREFIX + random_part
        self.prefix = API_KEY_PREFIX + random_part[:API_KEY_PREFIX_CHARS]
        self.key_hash = hash_api_key(key)
        return key


#: The day columns of the key and team month snapshots.
DAY_HELP = _("The month's latest day whose counter the snapshot copied.")
DAY_TOKENS_HELP = _(
    "That day's counter: settled usage plus the estimates of calls in flight. It comes "
    "back into Redis after a loss if the day is still today."
)
#: The payers' generation column (as ``UsageSnapshot.generation``). Its database default
#: lets a process still on the previous version insert rows during a rolling deploy.
PAYER_GENERATION_HELP = _(
    "The counters' generation when copied: a reset starts a new one, so Redis below "
    "this row in the same one has lost writes."
)


class ApiKeyUsageSnapshot(models.Model):
    """An API key's usage of one month, copied from Redis by the snapshot task, with
    the day counter of the month's latest day the task copied (``day``,
    ``day_base_tokens``): a Redis that lost its data gets the key's day back too, and
    one row per key and month is all a run writes."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="snapshots")
    period = models.DateField(_("period"), help_text=_("First day of the month."))
    requests = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    base_tokens = models.PositiveBigIntegerField(default=0)
    day = models.DateField(_("day"), null=True, blank=True, help_text=DAY_HELP)
    day_base_tokens = models.PositiveBigIntegerField(
        _("base tokens of the day"), default=0, help_text=DAY_TOKENS_HELP
    )
    generation = models.BigIntegerField(
        _("generation"), default=0, db_default=0, help_text=PAYER_GENERATION_HELP
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-period"]
        verbose_name = _("API key usage snapshot")
        verbose_name_plural = _("API key usage snapshots")
        constraints = [
            models.UniqueConstraint(
                fields=["api_key", "period"], name="llm_quota_key_snapshot_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.api_key} {self.period:%Y-%m}"


class DaySnapshot(models.Model):
    """A user's day counter (base tokens, in ``PERIOD_TIMEZONE``), copied by the usage
    snapshot beside the month's ``UsageSnapshot`` rows, so a Redis that lost its data
    gets the day back as well as the month. Summed over users, the rows of a day (and
    the month's ``UsageSnapshot`` rows) rebuild the global caps' counters."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_day_snapshots"
    )
    day = models.DateField(_("day"))
    base_tokens = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-day", "user"]
        verbose_name = _("day snapshot")
        verbose_name_plural = _("day snapshots")
        constraints = [
            models.UniqueConstraint(fields=["user", "day"], name="llm_quota_day_snapshot_unique")
        ]
        indexes = [models.Index(fields=["day", "user"])]

    def __str__(self) -> str:
        return f"{self.user} {self.day:%Y-%m-%d}"


class TeamUsageSnapshot(models.Model):
    """A team's usage of one month, copied from Redis by the snapshot task: what a
    team's month comes back from after Redis lost it (``ledger/team_restore.py``).
    ``by_member`` and ``by_model`` map a user id or a model name to its ``requests``,
    ``input_tokens``, ``output_tokens`` and ``base_tokens``: one row per team and month,
    however many members, and the admin's chart reads them. ``day`` and
    ``day_base_tokens`` hold the team's day counter, as on ``ApiKeyUsageSnapshot``."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="snapshots")
    period = models.DateField(_("period"), help_text=_("First day of the month."))
    requests = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    base_tokens = models.PositiveBigIntegerField(default=0)
    by_member = models.JSONField(_("by member"), default=dict, blank=True)
    by_model = models.JSONField(_("by model"), default=dict, blank=True)
    day = models.DateField(_("day"), null=True, blank=True, help_text=DAY_HELP)
    day_base_tokens = models.PositiveBigIntegerField(
        _("base tokens of the day"), default=0, help_text=DAY_TOKENS_HELP
    )
    generation = models.BigIntegerField(
        _("generation"), default=0, db_default=0, help_text=PAYER_GENERATION_HELP
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-period"]
        verbose_name = _("team usage snapshot")
        verbose_name_plural = _("team usage snapshots")
        constraints = [
            models.UniqueConstraint(
                fields=["team", "period"], name="llm_quota_team_snapshot_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.team} {self.period:%Y-%m}"
