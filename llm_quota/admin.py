"""The admin: tiers and prices edited with validation, quotas with live usage from
Redis and actions, read-only snapshots with CSV export, and a usage page with charts.

Live figures come from Redis in one pipelined round trip per change-list page; the
charts and the CSV read ``UsageSnapshot`` (one query each), which lags Redis by up
to one ``SNAPSHOT_INTERVAL``: the page says by how much.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import (
    BigIntegerField,
    Case,
    F,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from redis.exceptions import LockError, RedisError

from llm_quota.conf import quota_settings
from llm_quota.durations import human_duration
from llm_quota.forms import ModelPriceForm, TierForm, base_token_usd, usd_per_million
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import UserUsage
from llm_quota.models import (
    LIMIT_FIELDS,
    UNLIMITED,
    DaySnapshot,
    ModelPrice,
    QuotaUser,
    Tier,
    UsageSnapshot,
    UserQuota,
)
from llm_quota.quota import runaway
from llm_quota.reporting import charts, snapshot_totals
from llm_quota.reporting.bars import usage_bar
from llm_quota.reporting.cost import cost_usd
from llm_quota.reporting.snapshot import last_run, snapshot_users
from llm_quota.reporting.snapshot_csv import csv_rows
from llm_quota.reporting.snapshot_days import day_date
from llm_quota.rules.periods import add_months, first_day
from llm_quota.rules.policy import default_tier, limits_in_effect

# -- tiers and prices ------------------------------------------------------------------


def _amount(value: int | None) -> str:
    """A limit as the admin shows every figure: thousands separated, None unlimited."""
    return "unlimited" if value is None else f"{value:,}"


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    form = TierForm
    list_display = (
        "name", "rpm", "tpm", "tpd", "tokens_month", "concurrent", "soft_limit", "is_default",
    )  # fmt: skip
    search_fields = ("name",)

    # Short headings and thousands separators: the list fits 1280 px beside the sidebar.
    @admin.display(description="requests / min", ordering="requests_per_minute")
    def rpm(self, tier: Tier) -> str:
        return _amount(tier.requests_per_minute)

    @admin.display(description="tokens / min", ordering="tokens_per_minute")
    def tpm(self, tier: Tier) -> str:
        return _amount(tier.tokens_per_minute)

    @admin.display(description="tokens / day", ordering="tokens_per_day")
    def tpd(self, tier: Tier) -> str:
        return _amount(tier.tokens_per_day)

    @admin.display(description="tokens / month", ordering="tokens_per_month")
    def tokens_month(self, tier: Tier) -> str:
        return _amount(tier.tokens_per_month)

    @admin.display(description="concurrent", ordering="max_concurrent_requests")
    def concurrent(self, tier: Tier) -> str:
        return _amount(tier.max_concurrent_requests)

    @admin.display(description="soft limit", ordering="soft_limit_percent")
    def soft_limit(self, tier: Tier) -> str:
        return f"{tier.soft_limit_percent}%"

    fieldsets = (
        (None, {"fields": ("name", "is_default", "scopes")}),
        (
            "Limits (base tokens; empty = unlimited)",
            {
                "fields": (
                    ("requests_per_minute", "max_concurrent_requests"),
                    ("tokens_per_minute", "tokens_per_day", "tokens_per_month"),
                    "max_tokens_per_request",
                    ("soft_limit_percent", "soft_limit_mode"),
                )
            },
        ),
        (
            "Runaway protection (empty = off)",
            {"fields": (("burn_multiplier", "burn_floor", "burn_pause_seconds"),)},
        ),
        ("Models", {"fields": ("allowed_models",)}),
        ("Upgrade", {"fields": ("upgrade_to", "upgrade_url")}),
    )

    def save_model(self, request: HttpRequest, obj: Tier, form: Any, change: bool) -> None:
        # Exactly one default: ticking it here moves it from the old default, atomically.
        with transaction.atomic():
            if obj.is_default:
                previous = list(
                    Tier.objects.select_for_update()
                    .filter(is_default=True)
                    .exclude(pk=obj.pk)
                    .values_list("name", flat=True)
                )
                if previous:
                    Tier.objects.filter(name__in=previous).update(is_default=False)
                    self.message_user(
                        request, f"{', '.join(previous)} is no longer the default tier."
                    )
            super().save_model(request, obj, form, change)
        if getattr(form, "made_default", False):
            self.message_user(
                request, f"{obj.name} is the first tier, so it is the default tier: users "
                "without a user quota get it.",
            )  # fmt: skip

    @staticmethod
    def _in_use_as_default(queryset: QuerySet[Tier]) -> QuerySet[Tier]:
        """The tier users without a quota get: the one marked default, else (none
        marked) the one ``DEFAULT_TIER`` names. Deleting it would leave them none."""
        if Tier.objects.filter(is_default=True).exists():
            return queryset.filter(is_default=True)
        return queryset.filter(name=quota_settings.DEFAULT_TIER)

    def has_delete_permission(self, request: HttpRequest, obj: Tier | None = None) -> bool:
        if obj is not None and self._in_use_as_default(Tier.objects.filter(pk=obj.pk)).exists():
            return False  # new users would be left with no tier
        return super().has_delete_permission(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Tier]) -> None:
        kept = self._in_use_as_default(queryset)
        if kept.exists():
            self.message_user(
                request, "The default tier was kept: make another tier the default first.",
                messages.WARNING,
            )  # fmt: skip
        super().delete_queryset(request, queryset.exclude(pk__in=kept.values("pk")))


def _usd_per_million(stored: Decimal | None) -> str:
    """A multiplier as dollars per million tokens, for the list."""
    return "—" if stored is None else f"${usd_per_million(stored):,f}"


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Prices are entered and listed in USD per million tokens; they are stored as
    multipliers of one *base token*, the unit every budget counts in, which the form
    keeps under "Advanced"."""

    form = ModelPriceForm
    list_display = (
        "model", "input_usd", "output_usd", "cached_input_usd", "max_output", "window", "enabled",
    )  # fmt: skip
    search_fields = ("model",)

    def get_fieldsets(self, request: HttpRequest, obj: ModelPrice | None = None) -> Any:
        rate = base_token_usd()
        base = (
            f"A base token is the unit every budget counts in; a million of them cost "
            f"${rate:f} (BASE_TOKEN_USD_PER_MILLION). The price you enter here is stored as "
            "base tokens per token (the multiplier), rounded up to six places."
        )
        return (
            (None, {"fields": ("model", "enabled")}),
            (
                "Price, USD per 1M tokens",
                {"fields": (("input_usd", "output_usd", "cached_input_usd"),), "description": base},
            ),
            (
                "Counting",
                {
                    "fields": (
                        "encoding",
                        "default_max_output_tokens",
                        "context_window",
                        "output_cap_field",
                    )
                },
            ),  # fmt: skip
            (
                "Advanced: multipliers (base tokens per token)",
                {
                    "classes": ("collapse",),
                    "fields": (
                        ("input_multiplier", "output_multiplier", "cached_input_multiplier"),
                    ),
                    "description": "Used where the USD price above is left as it was.",
                },
            ),
        )

    @admin.display(description="input, USD / 1M", ordering="input_multiplier")
    def input_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.input_multiplier)

    @admin.display(description="output, USD / 1M", ordering="output_multiplier")
    def output_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.output_multiplier)

    @admin.display(description="cached input, USD / 1M", ordering="cached_input_multiplier")
    def cached_input_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.cached_input_multiplier)

    @admin.display(description="default max output", ordering="default_max_output_tokens")
    def max_output(self, price: ModelPrice) -> str:
        return f"{price.default_max_output_tokens:,}"

    @admin.display(description="context window", ordering="context_window")
    def window(self, price: ModelPrice) -> str:
        return "—" if price.context_window is None else f"{price.context_window:,}"


# -- every user's standing and live usage ------------------------------------------------
#
# Two lists share these columns: user quotas (the users with a row) and users (every
# user, a proxy of the user model). A user without a row is on the default tier.


@dataclass(frozen=True)
class _Standing:
    """A user's tier, their quota row if any, and each limit in effect (None: unlimited)."""

    tier: Tier | None
    quota: UserQuota | None
    limits: dict[str, int | None]


def _standing(quota: UserQuota | None, default: Tier | None) -> _Standing:
    """What ``rules.policy`` decides with, read from rows already loaded: the quota's
    tier and overrides, else the default tier (``policy.limits_in_effect``)."""
    tier = quota.tier if quota is not None else default
    limits = limits_in_effect(tier, quota)
    return _Standing(tier, quota, limits)


_BLOCKED = format_html('<strong style="color:var(--error-fg, #ba2121)">{}</strong>', "blocked")


def _quota_of(user: Any) -> UserQuota | None:
    # A missing reverse one-to-one raises RelatedObjectDoesNotExist, an AttributeError.
    return getattr(user, "llm_quota", None)


class _LiveUsageColumns:
    """The live columns of a change list: every row's counters come from Redis in one
    pipelined round trip per page (``Ledger.usage_many``), and its limits from rows
    the page already loaded. Subclasses say how a row names its user and quota."""

    def _user_pk(self, obj: Any) -> Any:
        raise NotImplementedError

    def _quota(self, obj: Any) -> UserQuota | None:
        raise NotImplementedError

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)  # type: ignore[misc]
        context = getattr(response, "context_data", None) or {}
        cl = context.get("cl")
        if cl is not None:
            rows = list(cl.result_list)
            try:
                live = get_ledger().usage_many([self._user_pk(row) for row in rows])
            except RedisError as exc:
                self.message_user(  # type: ignore[attr-defined]
                    request, f"Redis is unavailable: {exc}", messages.ERROR
                )
                live = {}
            default = default_tier()
            for row in rows:
                row._live = live.get(str(self._user_pk(row)))
                row._standing = _standing(self._quota(row), default)
        return response

    @staticmethod
    def _live(obj: Any) -> UserUsage | None:
        return getattr(obj, "_live", None)

    @admin.display(description="today")
    def today(self, obj: Any) -> Any:
        live, standing = self._live(obj), obj._standing
        if live is None or standing.tier is None:
            return "—"
        return usage_bar(
            "Today", live.tokens_today, standing.limits["tokens_per_day"],
            standing.tier.soft_limit_percent,
        )  # fmt: skip

    @admin.display(description="this month")
    def this_month(self, obj: Any) -> Any:
        live, standing = self._live(obj), obj._standing
        if live is None or standing.tier is None:
            return "—"
        return usage_bar(
            "This month", live.tokens_this_month, standing.limits["tokens_per_month"],
            standing.tier.soft_limit_percent,
        )  # fmt: skip

    @admin.display(description="left this month")
    def remaining(self, obj: Any) -> Any:
        live = self._live(obj)
        if live is None:
            return "—"
        return _left_of(obj._standing.limits["tokens_per_month"], live)


def _left_of(budget: int | None, live: UserUsage) -> str:
    return "unlimited" if budget is None else f"{max(0, budget - live.tokens_this_month):,}"


_LIMIT_NAMES = {
    "requests_per_minute": "Requests per minute",
    "tokens_per_minute": "Tokens per minute",
    "tokens_per_day": "Tokens per day",
    "tokens_per_month": "Tokens per month",
    "max_concurrent_requests": "Concurrent requests",
    "max_tokens_per_request": "Tokens per request",
}


def _limits_table(standing: _Standing) -> str:
    """Each limit in effect and where it comes from: the tier, or this user's override."""
    if standing.tier is None:
        return "No tier applies: no tier is marked default and DEFAULT_TIER names none."
    rows = []
    for name in LIMIT_FIELDS:
        value = standing.limits[name]
        own = standing.quota is not None and getattr(standing.quota, name) is not None
        source = "this user’s override" if own else f"from the tier {standing.tier.name}"
        rows.append((_LIMIT_NAMES[name], "unlimited" if value is None else f"{value:,}", source))
    return format_html(
        '<table class="llmq-limits"><thead><tr><th>Limit</th><th>In effect</th><th>Set by</th>'
        "</tr></thead><tbody>{}</tbody></table>",
        format_html_join("", "<tr><th>{}</th><td>{}</td><td>{}</td></tr>", rows),
    )


def _live_usage(user_pk: Any, standing: _Standing) -> str:
    """The user's counters from Redis, as bars and figures, and what of them the
    database already holds (the durability window)."""
    ledger = get_ledger()
    try:
        live = ledger.usage(user_pk)
        now_ms = ledger.now_ms()
        run = last_run()
    except RedisError as exc:
        return f"Redis is unavailable: {exc}"
    budget = standing.limits["tokens_per_month"]
    soft = standing.tier.soft_limit_percent if standing.tier is not None else 100
    period = first_day(live.month)
    stored = sum(
        UsageSnapshot.objects.filter(user_id=user_pk, period=period).values_list(
            "base_tokens", flat=True
        )
    )
    at_risk = max(0, live.settled_this_month - stored)
    day_budget = standing.limits["tokens_per_day"]
    rows = [
        ("Period", f"{period:%B %Y}"),
        ("Today", usage_bar("Today", live.tokens_today, day_budget, soft)),
        ("Used today (incl. reserved)", f"{live.tokens_today:,}"),
        ("The day's budget starts again in", human_duration((live.day_end_ms - now_ms) / 1000)),
        ("This month", usage_bar("This month", live.tokens_this_month, budget, soft)),
        ("Used this month (incl. reserved)", f"{live.tokens_this_month:,}"),
        ("The month's budget starts again in", human_duration((live.month_end_ms - now_ms) / 1000)),
        (
            "Reserved by calls in flight",
            f"{live.reserved:,} ({live.in_flight} call{'' if live.in_flight == 1 else 's'})",
        ),
        ("Monthly budget", "unlimited" if budget is None else f"{budget:,}"),
        ("Remaining", _left_of(budget, live)),
        ("Settled cost this month", f"${cost_usd(live.settled_this_month)}"),
        ("Settled, in the last snapshot", f"{stored:,}"),
        ("Not yet snapshotted (lost if Redis loses its data now)", f"{at_risk:,}"),
        ("Last snapshot run", _run_age(run)),
    ]
    models = format_html_join(
        "", "<li>{}: {} requests, {} in / {} out, {} base tokens</li>",
        (
            (m.model, f"{m.requests:,}", f"{m.input_tokens:,}", f"{m.output_tokens:,}",
             f"{m.base_tokens:,}")
            for m in live.by_model
        ),
    )  # fmt: skip
    return format_html(
        '<table class="llmq-live">{}</table><ul>{}</ul>',
        format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
        models or "no settled usage this month",
    )


# -- every user: filters ----------------------------------------------------------------


class _TierFilter(admin.SimpleListFilter):
    """By tier; the default tier's users include everyone without a user quota."""

    title = "tier"
    parameter_name = "tier"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        default = default_tier()
        return [
            (str(t.pk), f"{t.name} (default)" if default and t.pk == default.pk else t.name)
            for t in Tier.objects.order_by("name")
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not self.value():
            return queryset
        try:
            pk = Tier._meta.pk.to_python(self.value())
        except ValidationError as exc:  # the change list says so instead of a 500
            raise IncorrectLookupParameters(exc) from exc
        default = default_tier()
        match = Q(llm_quota__tier_id=pk)
        if default is not None and default.pk == pk:
            match |= Q(llm_quota__isnull=True)
        return queryset.filter(match)


class _BlockedFilter(admin.SimpleListFilter):
    title = "blocked"
    parameter_name = "blocked"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(llm_quota__blocked=True)
        if self.value() == "no":
            return queryset.filter(Q(llm_quota__isnull=True) | Q(llm_quota__blocked=False))
        return queryset


class _PausedFilter(admin.SimpleListFilter):
    """Users (keys, teams: ``kind``) the burn-rate breaker paused (contract §11), read
    from Redis' list of them (``quota/runaway.py``): one round trip, whatever the
    table's size."""

    title = "burn-rate pause"
    parameter_name = "paused"
    kind = "user"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Paused now")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() != "yes":
            return queryset
        try:
            ids = runaway.paused_ids(get_ledger(), self.kind)
        except RedisError as exc:
            raise IncorrectLookupParameters(f"Redis is unavailable: {exc}") from exc
        to_pk = queryset.model._meta.pk.to_python
        return queryset.filter(pk__in=[to_pk(pk) for pk in ids])


class _PausedKeyFilter(_PausedFilter):
    kind = "key"


class _PausedTeamFilter(_PausedFilter):
    kind = "team"


def _resume_payers(
    model_admin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet, resume: Any
) -> None:
    """The admins' "Resume" action: ``resume(ledger, obj)`` for each selected row."""
    ledger = get_ledger()
    try:
        resumed = sum(resume(ledger, obj) for obj in queryset)
    except RedisError as exc:
        model_admin.message_user(request, f"Resume failed: {exc}", messages.ERROR)
        return
    name = queryset.model._meta.verbose_name
    model_admin.message_user(request, f"Resumed {resumed} paused {name}(s) of {len(queryset)}.")


def _big(value: int | None) -> Value:
    return Value(value, output_field=BigIntegerField())


class _MonthBudgetFilter(admin.SimpleListFilter):
    """Users past their tier's soft limit (the threshold of the ``soft_limit_crossed``
    alert, ``quota/alerts.py``) or with the month's budget used up.

    Read from this month's snapshots, in SQL, so it scales with the user table rather
    than with Redis round trips; it lags Redis by at most one ``SNAPSHOT_INTERVAL``."""

    title = "this month's budget (last snapshot)"
    parameter_name = "month_budget"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("soft", "Past the soft limit"), ("used_up", "Used up")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() not in ("soft", "used_up"):
            return queryset
        default = default_tier()
        default_budget = None if default is None else default.tokens_per_month
        default_soft = 100 if default is None else default.soft_limit_percent
        used = (
            UsageSnapshot.objects.filter(user=OuterRef("pk"), period=_current_period())
            .values("user")
            .annotate(total=Sum("base_tokens"))
            .values("total")
        )
        budget = Case(
            When(llm_quota__isnull=True, then=_big(default_budget)),
            When(llm_quota__tokens_per_month=UNLIMITED, then=_big(None)),
            When(llm_quota__tokens_per_month__isnull=False, then=F("llm_quota__tokens_per_month")),
            default=F("llm_quota__tier__tokens_per_month"),
            output_field=BigIntegerField(),
        )
        if self.value() == "used_up":
            percent: Any = _big(100)
        else:
            percent = Case(
                When(llm_quota__isnull=True, then=_big(default_soft)),
                default=F("llm_quota__tier__soft_limit_percent"),
                output_field=BigIntegerField(),
            )
        return (
            queryset.annotate(
                llmq_used=Coalesce(Subquery(used, output_field=BigIntegerField()), 0) * 100,
                llmq_threshold=budget * percent,
            )
            .filter(llmq_threshold__isnull=False)
            .filter(llmq_used__gte=F("llmq_threshold"))
        )


# -- every user: the list and each user's page ------------------------------------------


def _user_fields(*candidates: str) -> list[str]:
    """The names among ``candidates`` that the project's user model has."""
    names = {f.name for f in QuotaUser._meta.get_fields()}
    # dict.fromkeys: once each, where USERNAME_FIELD is the email field too.
    return [name for name in dict.fromkeys(candidates) if name in names]


@admin.register(QuotaUser)
class QuotaUserAdmin(_LiveUsageColumns, admin.ModelAdmin):
    """Every user, with or without a user quota: their tier, the limits in effect
    and live usage. Read-only: a user's quota is given or changed in User quotas,
    one click away; the user itself is edited where the project edits users."""

    # Few columns, so the list fits 1280 px beside the nav sidebar and the filters;
    # reserved and remaining tokens are on each user's page.
    list_display = ("who", "tier_name", "today", "this_month", "user_quota")
    list_display_links = ("who",)
    list_filter = (_TierFilter, _BlockedFilter, _MonthBudgetFilter, _PausedFilter)
    actions = ("resume_paused",)
    search_help_text = "Search by username, email or name."
    list_select_related = ("llm_quota__tier",)
    list_per_page = 50

    def _user_pk(self, user: Any) -> Any:
        return user.pk

    def _quota(self, user: Any) -> UserQuota | None:
        return _quota_of(user)

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        model = QuotaUser
        return _user_fields(
            model.USERNAME_FIELD, model.get_email_field_name(), "first_name", "last_name"
        )

    def get_ordering(self, request: HttpRequest) -> list[str]:
        return [QuotaUser.USERNAME_FIELD]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_resume_permission(self, request: HttpRequest) -> bool:
        """Resuming is changing a user's quota: whoever may edit user quotas."""
        return request.user.has_perm("llm_quota.change_userquota")

    @admin.action(description="Resume: end the burn-rate pause", permissions=["resume"])
    def resume_paused(self, request: HttpRequest, queryset: QuerySet) -> None:
        _resume_payers(self, request, queryset, lambda ledger, u: runaway.resume(ledger, u.pk))

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        links = self._quota_links(request)
        cl = (getattr(response, "context_data", None) or {}).get("cl")
        for user in [] if cl is None else cl.result_list:
            user._quota_links = links
        return response

    def _quota_links(self, request: HttpRequest) -> tuple[bool, bool]:
        """Whether ``request``'s user may create user quotas, and see them."""
        quotas = self.admin_site._registry.get(UserQuota)
        if quotas is None:
            return False, False
        return quotas.has_add_permission(request), quotas.has_view_or_change_permission(request)

    @admin.display(description="user", ordering=QuotaUser.USERNAME_FIELD)
    def who(self, user: Any) -> str:
        email = getattr(user, user.get_email_field_name(), "")
        if not email:
            return user.get_username()
        return format_html(
            '{}<br><span class="llmq-email" style="overflow-wrap:anywhere;font-size:.9em;'
            'color:var(--body-quiet-color)">{}</span>',
            user.get_username(), email,
        )  # fmt: skip

    @admin.display(description="tier")
    def tier_name(self, user: Any) -> str:
        standing = user._standing
        if standing.tier is None:
            return "none"
        name = standing.tier.name if standing.quota else f"{standing.tier.name} (default)"
        if standing.quota is not None and standing.quota.blocked:
            return format_html("{}<br>{}", name, _BLOCKED)
        return name

    @admin.display(description="quota")  # short: the list fits beside the filters
    def user_quota(self, user: Any) -> str:
        may_add, may_view = getattr(user, "_quota_links", (False, False))
        return _quota_link(user, _quota_of(user), may_add, may_view) or "—"

    # -- the user's page (read-only)
    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        return (
            (None, {"fields": ("account",)}),
            ("LLM quota", {"fields": ("standing", "limits_in_effect")}),
            ("Live usage (Redis)", {"fields": ("live_usage",)}),
            ("Runaway protection (Redis)", {"fields": ("burn_rate",)}),
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [
            name for _, options in self.get_fieldsets(request, obj) for name in options["fields"]
        ]

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        user = super().get_object(request, object_id, from_field)
        if user is not None:
            user._quota_links = self._quota_links(request)
        return user

    @admin.display(description="user")
    def account(self, user: Any) -> str:
        """Who this is, without the user model's fields (its password hash among them)."""
        parts = [user.get_username()]
        full_name = user.get_full_name() if hasattr(user, "get_full_name") else ""
        email = getattr(user, user.get_email_field_name(), "")
        parts += [p for p in (full_name, email) if p]
        if not getattr(user, "is_active", True):
            parts.append("inactive")
        return " · ".join(parts)

    @admin.display(description="tier")
    def standing(self, user: Any) -> str:
        quota = _quota_of(user)
        tier = _standing(quota, default_tier()).tier
        may_add, may_view = getattr(user, "_quota_links", (False, False))
        link = _quota_link(user, quota, may_add, may_view)
        if tier is None:
            text = "none: no tier is marked default and DEFAULT_TIER names none"
        elif quota is None:
            text = f"{tier.name} (the default tier: no user quota)"
        else:
            text = f"{tier.name} (user quota{', blocked' if quota.blocked else ''})"
        return format_html("{} {}", text, link) if link else text

    @admin.display(description="limits in effect")
    def limits_in_effect(self, user: Any) -> str:
        return _limits_table(_standing(_quota_of(user), default_tier()))

    @admin.display(description="live usage")
    def live_usage(self, user: Any) -> str:
        return _live_usage(user.pk, _standing(_quota_of(user), default_tier()))

    @admin.display(description="rate vs baseline")
    def burn_rate(self, user: Any) -> str:
        return _burn_rate(user.pk, _standing(_quota_of(user), default_tier()).tier)


def _burn_rate(user_pk: Any, tier: Tier | None) -> str:
    """The burn-rate breaker for one user: paused or not, and the last minute's spend
    against their baseline and the line it trips at (``ledger/lua/burn.lua``)."""
    try:
        state = get_ledger().burn_state(user_pk)
    except RedisError as exc:
        return f"Redis is unavailable: {exc}"
    if state.paused_until_ms is not None:
        left = human_duration((state.paused_until_ms - state.now_ms) / 1000)
        status = format_html(
            "<strong>Paused</strong> for {} more. The Users list's Resume action ends it.", left
        )
    else:
        status = format_html("{}", "Not paused.")
    rows = [
        ("Last minute", float(state.last_minute), "base tokens"),
        ("Baseline (busiest minute)", float(state.baseline_per_minute), "base tokens"),
    ]
    settings = (tier.burn_multiplier, tier.burn_floor, tier.burn_pause_seconds) if tier else ()
    if tier is None or None in settings:
        status = format_html("{} The breaker is off for this user's tier.", status)
    else:
        multiplier, floor = float(tier.burn_multiplier or 0), int(tier.burn_floor or 0)
        trips_at = max(floor, multiplier * state.baseline_per_minute)
        rows.append(("Trips above", trips_at, f"({multiplier:g}x baseline, floor {floor:,})"))
    chart = charts.horizontal_bars(
        rows, label="The last minute's spend against the baseline", width=640
    )
    return format_html("<p>{}</p>{}", status, chart)


def _quota_link(user: Any, quota: UserQuota | None, may_add: bool, may_view: bool) -> str:
    """One click to a user's quota: open it, or create it with the user filled in."""
    if quota is not None and may_view:
        url = reverse("admin:llm_quota_userquota_change", args=[quota.pk])
        return format_html('<a href="{}">Open</a>', url)
    if quota is None and may_add:
        url = reverse("admin:llm_quota_userquota_add") + f"?user={user.pk}"
        return format_html('<a class="addlink" href="{}">Add</a>', url)
    return ""


# -- user quotas: the overrides, with live usage and actions ---------------------------


@admin.register(UserQuota)
class UserQuotaAdmin(_LiveUsageColumns, admin.ModelAdmin):
    # What is reserved by calls in flight is on each quota's page.
    list_display = ("user", "tier", "blocked_flag", "today", "this_month", "remaining")
    list_filter = ("tier", "blocked")
    search_help_text = (
        "Search by username or email. All users, with or without a user quota, are under Users."
    )
    list_select_related = ("user", "tier")
    raw_id_fields = ("user",)  # where the user model's admin cannot search (see below)
    readonly_fields = ("limits_in_effect", "live_usage")
    actions = ("block_users", "unblock_users", "reset_period_usage")

    def _user_pk(self, quota: UserQuota) -> Any:
        return quota.user_id

    @admin.display(description="blocked", ordering="blocked")
    def blocked_flag(self, quota: UserQuota) -> str:
        # Words, not Django's boolean icons: a green tick for "blocked" reads as fine.
        return _BLOCKED if quota.blocked else ""

    def _quota(self, quota: UserQuota) -> UserQuota | None:
        return quota

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        model = QuotaUser
        return [
            f"user__{name}"
            for name in _user_fields(model.USERNAME_FIELD, model.get_email_field_name())
        ]

    def get_autocomplete_fields(self, request: HttpRequest) -> list[str]:
        """Type to find the user, where the project's user admin can search (Django's
        ``UserAdmin`` can); else the raw id box with its lookup popup."""
        user_admin = self.admin_site._registry.get(get_user_model())
        return ["user"] if user_admin is not None and user_admin.search_fields else []

    def get_fieldsets(self, request: HttpRequest, obj: UserQuota | None = None) -> Any:
        fieldsets: list[Any] = [
            (None, {"fields": ("user", "tier", "blocked")}),
            ("Overrides of the tier's limits", {"fields": LIMIT_FIELDS}),
        ]
        if obj is not None:  # nothing to show before the row exists
            fieldsets.append(("In effect", {"fields": ("limits_in_effect", "live_usage")}))
        return fieldsets

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        """The default tier, so giving a user their own quota is one click and a save
        (``?user=`` from the users list fills in the user)."""
        initial = super().get_changeform_initial_data(request)
        default = default_tier()
        if "tier" not in initial and default is not None:
            initial["tier"] = default.pk
        return initial

    @admin.display(description="limits in effect")
    def limits_in_effect(self, quota: UserQuota) -> Any:
        return _limits_table(_standing(quota, None))

    @admin.display(description="live usage (Redis)")
    def live_usage(self, quota: UserQuota) -> Any:
        return _live_usage(quota.user_id, _standing(quota, None))

    # -- actions
    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if self.has_change_permission(request):
            for tier in Tier.objects.order_by("name"):
                name = f"move_to_tier_{tier.pk}"
                actions[name] = (self._mover(tier), name, f"Move to tier “{tier.name}”")
        return actions

    def _mover(self, tier: Tier) -> Any:
        def move(modeladmin: UserQuotaAdmin, request: HttpRequest, queryset: QuerySet) -> None:
            if not modeladmin.has_change_permission(request):
                raise PermissionDenied
            for quota in queryset:  # save(): signals drop every process's cached policy
                quota.tier = tier
                quota.save(update_fields=["tier"])
            modeladmin.message_user(request, f"Moved {len(queryset)} user(s) to {tier.name}.")

        return move

    @admin.action(description="Block LLM access", permissions=["change"])
    def block_users(self, request: HttpRequest, queryset: QuerySet[UserQuota]) -> None:
        self._set_blocked(request, queryset, True)

    @admin.action(description="Unblock LLM access", permissions=["change"])
    def unblock_users(self, request: HttpRequest, queryset: QuerySet[UserQuota]) -> None:
        self._set_blocked(request, queryset, False)

    def _set_blocked(self, request: HttpRequest, queryset: QuerySet, blocked: bool) -> None:
        for quota in queryset:
            quota.blocked = blocked
            quota.save(update_fields=["blocked"])
        verb = "Blocked" if blocked else "Unblocked"
        self.message_user(request, f"{verb} {len(queryset)} user(s).")

    @admin.action(description="Reset this period's usage (day and month)", permissions=["change"])
    def reset_period_usage(
        self, request: HttpRequest, queryset: QuerySet[UserQuota]
    ) -> HttpResponse | None:
        """A confirmation page first (Django's ``delete_selected`` convention); on
        confirm, each user's figures are snapshotted and written to their admin history,
        then forgiven, so what was reset stays on record."""
        quotas = list(queryset)
        if request.POST.get("post") != "yes":
            return self._reset_confirmation(request, quotas)
        ledger = get_ledger()
        try:
            # Holding the snapshot lock: no run can copy pre-reset figures back over
            # the zeroed rows after this.
            with ledger.client.lock(
                ledger.keyspace.snapshot_lock(), timeout=60, blocking_timeout=10
            ):
                snapshot_users([q.user_id for q in quotas], ledger=ledger)
                for quota in quotas:
                    self._reset_one(request, ledger, quota)
        except (RedisError, LockError) as exc:
            self.message_user(request, f"Reset failed: {exc}", messages.ERROR)
            return None
        self.message_user(
            request, f"Reset this period's usage of {len(quotas)} user(s); the usage "
            "forgiven is in each user quota's history.",
        )  # fmt: skip
        return None

    def _reset_one(self, request: HttpRequest, ledger: Any, quota: UserQuota) -> None:
        """Forgive the user's usage, record the snapshotted figures, then zero them."""
        reset = ledger.reset_period(quota.user_id)
        period = first_day(reset.month)
        rows = UsageSnapshot.objects.filter(user_id=quota.user_id, period=period)
        forgiven = ", ".join(
            f"{row.model}: {row.requests:,} requests, {row.base_tokens:,} base tokens "
            f"(${cost_usd(row.base_tokens)})"
            for row in rows.order_by("model")
        )
        rows.update(requests=0, input_tokens=0, output_tokens=0, base_tokens=0)
        # The day too: a Redis loss before the user's next snapshot must not restore the
        # day that was forgiven.
        DaySnapshot.objects.filter(user_id=quota.user_id, day=day_date(reset.day)).update(
            base_tokens=0
        )
        self.log_change(
            request, quota, f"Reset the usage of {period:%B %Y} "
            f"({reset.tokens_before:,} base tokens): {forgiven or 'nothing settled'}."
            f"{_reset_keys(ledger, quota.user_id, period)}",
        )  # fmt: skip

    def _reset_confirmation(self, request: HttpRequest, quotas: list[UserQuota]) -> HttpResponse:
        try:
            live = get_ledger().usage_many([q.user_id for q in quotas])
        except RedisError as exc:
            self.message_user(request, f"Redis is unavailable: {exc}", messages.ERROR)
            live = {}
        rows = []
        for quota in quotas:
            usage = live.get(str(quota.user_id))
            rows.append(
                (quota, "—" if usage is None else f"{usage.tokens_today:,}",
                 "—" if usage is None else f"{usage.settled_this_month:,}")
            )  # fmt: skip
        context = {
            **self.admin_site.each_context(request),
            "title": "Reset this period's usage?",
            "opts": self.model._meta,
            "rows": rows,
            "queryset": quotas,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/llm_quota/userquota/reset_confirmation.html", context
        )


def _reset_keys(ledger: Any, user_id: Any, period: date) -> str:
    """The user's API keys go with the user's reset: their spend is part of the user's,
    and a key still refusing by ``key.tokens_per_month`` would undo the reset. Their
    month's snapshot rows are zeroed with the user's; returns the history's sentence."""
    from llm_quota.models import ApiKey, ApiKeyUsageSnapshot

    api_keys = list(ApiKey.objects.filter(user_id=user_id).order_by("pk"))
    if not api_keys:
        return ""
    before = ledger.reset_keys(user_id, [k.pk for k in api_keys])
    ApiKeyUsageSnapshot.objects.filter(api_key__in=api_keys, period=period).update(
        requests=0, input_tokens=0, output_tokens=0, base_tokens=0, day_base_tokens=0
    )
    spent = ", ".join(f"{k.prefix}: {n:,}" for k, n in zip(api_keys, before, strict=True) if n)
    return f" API keys reset with it ({spent or 'none had usage'})."


def _run_age(run: dict[str, Any] | None) -> str:
    if run is None:
        return "none recorded (none yet, or Redis lost it) — check the Celery beat"
    age = time.time() - run["recorded_at"]
    return (
        f"{human_duration(age)} ago: {run['users']} users read, {run['rows_written']} rows written "
        f"(every {human_duration(quota_settings.SNAPSHOT_INTERVAL)})"
    )


# -- snapshots, charts and CSV ----------------------------------------------------------


@admin.register(UsageSnapshot)
class UsageSnapshotAdmin(admin.ModelAdmin):
    # Input and output tokens are on each row's page and in the CSV: with them the list
    # does not fit 1280 px beside the sidebar and the filters.
    list_display = ("user", "month", "model", "request_count", "base", "cost")
    list_per_page = 50
    # The month is chosen by the date hierarchy: a date filter ("past 7 days") means
    # nothing for rows that each hold a month.
    list_filter = ("model", ("user__llm_quota__tier", admin.RelatedOnlyFieldListFilter))
    list_select_related = ("user",)
    search_fields = ("user__username", "model")
    date_hierarchy = "period"
    actions = ("export_csv",)

    # Snapshots are written by the snapshot task only.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="month", ordering="period")
    def month(self, row: UsageSnapshot) -> str:
        return f"{row.period:%b %Y}"

    @admin.display(description="requests", ordering="requests")
    def request_count(self, row: UsageSnapshot) -> str:
        return f"{row.requests:,}"

    @admin.display(description="base tokens", ordering="base_tokens")
    def base(self, row: UsageSnapshot) -> str:
        return f"{row.base_tokens:,}"

    @admin.display(description="cost (USD)", ordering="base_tokens")
    def cost(self, row: UsageSnapshot) -> str:
        return str(cost_usd(row.base_tokens))

    @admin.action(description="Export selected rows as CSV", permissions=["view"])
    def export_csv(self, request: HttpRequest, queryset: QuerySet[UsageSnapshot]) -> Any:
        return _csv_response(queryset, "usage-snapshots.csv")

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        return [
            path("report/", wrap(self.report_view), name="llm_quota_usage_report"),
            path("report/csv/", wrap(self.report_csv_view), name="llm_quota_usage_csv"),
            *super().get_urls(),
        ]

    def report_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        period = _current_period()
        spend = snapshot_totals.monthly_spend(period)
        rate = float(quota_settings.BASE_TOKEN_USD_PER_MILLION) / 1e6
        spend_chart = charts.stacked_bars(
            [f"{p:%b %Y}" for p in spend.periods],
            [charts.Series(m, [v * rate for v in values]) for m, values in spend.by_model.items()],
            label="Spend per month in USD, by model",
            fmt=charts.usd,
        )
        models = snapshot_totals.model_totals(period)
        model_chart = charts.horizontal_bars(
            [(m.model, m.base_tokens, f"({charts.usd(m.base_tokens * rate)})") for m in models],
            label=f"Base tokens by model, {period:%B %Y}",
        )
        users = snapshot_totals.top_users(period)
        user_chart = charts.horizontal_bars(
            [
                (u.username, u.base_tokens, "" if u.percent is None else f"({u.percent}%)")
                for u in users
            ],
            label=f"Top users, {period:%B %Y} (share of their monthly budget)",
            color=charts.PALETTE[1],
        )
        try:
            run = last_run()
        except RedisError:
            run = None
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "LLM usage",
            "period": period,
            "spend_chart": spend_chart,
            "model_chart": model_chart,
            "user_chart": user_chart,
            "models": models,
            "users": users,
            "snapshot_age": _run_age(run),
            "snapshot_interval": human_duration(quota_settings.SNAPSHOT_INTERVAL),
            "total_cost": cost_usd(sum(m.base_tokens for m in models)),
            "csv_url": reverse("admin:llm_quota_usage_csv"),
            "users_url": reverse("admin:llm_quota_quotauser_changelist"),
        }
        return TemplateResponse(request, "admin/llm_quota/usagesnapshot/report.html", context)

    def report_csv_view(self, request: HttpRequest) -> StreamingHttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        queryset = UsageSnapshot.objects.all()
        months = request.GET.get("months")
        if months and months.isdigit():
            queryset = queryset.filter(period__gte=add_months(_current_period(), 1 - int(months)))
        return _csv_response(queryset, "llm-usage.csv")


def _current_period() -> date:
    """The first day of the ledger's current month (its clock, its timezone)."""
    ledger = get_ledger()
    moment = ledger.clock() if ledger.clock is not None else time.time()
    return first_day(ledger.periods(int(moment * 1000))[1])


def _csv_response(queryset: QuerySet[UsageSnapshot], filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(csv_rows(queryset), content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# -- API keys (contract section 9) -------------------------------------------------------
# Kept in one block: the key is shown once, in the message after "Save" on the add
# page; the lists show its prefix, last use and live usage, never the key or its hash.

from django.utils import timezone  # noqa: E402

from llm_quota.models import ApiKey, ApiKeyUsageSnapshot  # noqa: E402
from llm_quota.reporting.key_usage import key_usage_report  # noqa: E402


class ApiKeyUsageInline(admin.TabularInline):
    model = ApiKeyUsageSnapshot
    fields = (
        "period", "requests", "input_tokens", "output_tokens", "base_tokens", "day",
        "day_base_tokens", "updated_at",
    )  # fmt: skip
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "usage by month (as of the last snapshot)"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "name", "user", "prefix", "created_at", "last_use", "expires_at", "status",
        "tokens_this_month", "requests_this_month",
    )  # fmt: skip
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), _PausedKeyFilter)
    search_fields = ("name", "prefix", "user__username")
    raw_id_fields = ("user",)
    list_per_page = 50
    actions = ["revoke_keys", "resume_paused"]
    inlines = [ApiKeyUsageInline]
    readonly_fields = ("prefix", "created_at", "last_use", "revoked_at", "live_usage")
    fieldsets = (
        (None, {"fields": ("user", "name", "scopes", "team", "expires_at")}),
        ("Key limits (base tokens; empty = unlimited)", {
            "fields": ("requests_per_minute", "tokens_per_day", "tokens_per_month"),
        }),
        ("State", {"fields": ("prefix", "created_at", "last_use", "revoked_at", "live_usage")}),
    )  # fmt: skip

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        # The owner of an existing key is fixed: its counters live under that user.
        return (*self.readonly_fields, "user") if obj is not None else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        plaintext = None if change else obj.issue()
        super().save_model(request, obj, form, change)
        if plaintext is not None:
            messages.warning(
                request,
                format_html(
                    "The API key <code>{}</code> is shown this once: copy it now. Only its "
                    "hash is stored.",
                    plaintext,
                ),
            )

    @staticmethod
    def _report(key: ApiKey) -> dict[str, Any] | None:
        """The key's live report, read once per object (a page's rows, the change form)."""
        if not key.pk:
            return None
        cache = vars(key)
        if "_live" not in cache:
            try:
                cache["_live"] = key_usage_report(key)
            except RedisError:
                cache["_live"] = None
        return cache["_live"]

    @admin.display(description="last use")
    def last_use(self, key: ApiKey) -> Any:
        report = self._report(key)
        return (report or {}).get("last_used_at") or key.last_used_at or "never"

    @admin.display(description="status")
    def status(self, key: ApiKey) -> str:
        if key.revoked_at is not None:
            return "revoked"
        if key.expires_at is not None and key.expires_at <= timezone.now():
            return "expired"
        return "active"

    @admin.display(description="tokens this month")
    def tokens_this_month(self, key: ApiKey) -> Any:
        report = self._report(key)
        return "?" if report is None else report["usage"]["tokens_this_month"]

    @admin.display(description="requests this month")
    def requests_this_month(self, key: ApiKey) -> Any:
        report = self._report(key)
        return "?" if report is None else report["usage"]["requests_this_month"]

    @admin.display(description="live usage")
    def live_usage(self, key: ApiKey) -> Any:
        report = self._report(key)
        if report is None:
            return "-"
        usage, remaining = report["usage"], report["remaining"]
        return format_html(
            "{} base tokens today, {} this month ({} reserved); {} requests this month. "
            "Left: {} today, {} this month.",
            usage["tokens_today"], usage["tokens_this_month"], usage["reserved"],
            usage["requests_this_month"],
            remaining["tokens_per_day"] if remaining["tokens_per_day"] is not None else "∞",
            remaining["tokens_per_month"] if remaining["tokens_per_month"] is not None else "∞",
        )  # fmt: skip

    @admin.action(description="Revoke selected API keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = 0
        for key in queryset.filter(revoked_at__isnull=True):
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])  # post_save: every process is told
            revoked += 1
        self.message_user(request, f"{revoked} API key(s) revoked.", messages.SUCCESS)

    @admin.action(description="Resume: end the burn-rate pause", permissions=["change"])
    def resume_paused(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        _resume_payers(
            self, request, queryset, lambda ledger, k: runaway.resume_key(ledger, k.user_id, k.pk)
        )


# -- teams (contract section 10) ---------------------------------------------------------
# Members inline; the change list and page show the team's live usage from Redis.

from llm_quota.models import Team, TeamMembership, TeamUsageSnapshot  # noqa: E402
from llm_quota.reporting.team_charts import team_usage_chart  # noqa: E402
from llm_quota.reporting.team_snapshot import snapshot_teams  # noqa: E402
from llm_quota.reporting.team_usage import team_usage_report  # noqa: E402
from llm_quota.rules.teams import team_policy  # noqa: E402


class TeamMembershipInline(admin.TabularInline):
    model = TeamMembership
    raw_id_fields = ("user",)
    extra = 1


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "tier", "member_count", "tokens_this_month", "blocked")
    list_filter = ("tier", "blocked", _PausedTeamFilter)
    search_fields = ("slug", "name")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [TeamMembershipInline]
    readonly_fields = ("live_usage", "usage_chart")
    fieldsets = (
        (None, {"fields": ("slug", "name", "tier", "blocked")}),
        ("Overrides of the tier (empty: the tier's; 0: unlimited)", {
            "fields": (("requests_per_minute", "max_concurrent_requests"),
                       ("tokens_per_day", "tokens_per_month"), "max_tokens_per_request"),
        }),
        ("Live usage", {"fields": ("live_usage",)}),
        ("Usage by month and member (snapshots)", {"fields": ("usage_chart",)}),
    )  # fmt: skip

    @admin.display(description="chart")
    def usage_chart(self, team: Team) -> Any:
        if not team.pk:
            return "-"
        try:
            _, month = get_ledger().periods()
            last = first_day(month)
        except RedisError:
            last = date.today().replace(day=1)
        return team_usage_chart(team.pk, last)

    @staticmethod
    def _report(team: Team) -> dict[str, Any] | None:
        if not team.pk:
            return None
        cache = vars(team)
        if "_live" not in cache:
            policy = team_policy(team.pk)
            try:
                cache["_live"] = team_usage_report(policy) if policy else None
            except RedisError:
                cache["_live"] = None
        return cache["_live"]

    actions = ("reset_team_usage", "resume_paused")

    @admin.action(description="Reset this period's usage (day and month)", permissions=["change"])
    def reset_team_usage(
        self, request: HttpRequest, queryset: QuerySet[Team]
    ) -> HttpResponse | None:
        """As the user quotas' reset: a confirmation page first; on confirm, each team's
        month is snapshotted and written to its admin history, then forgiven (the
        members' own counters and the global caps keep the usage)."""
        teams = list(queryset)
        if request.POST.get("post") != "yes":
            return self._reset_confirmation(request, teams)
        ledger = get_ledger()
        try:
            # Holding the snapshot lock: no run copies pre-reset figures back after this.
            with ledger.client.lock(
                ledger.keyspace.snapshot_lock(), timeout=60, blocking_timeout=10
            ):
                _, month = ledger.periods()
                snapshot_teams(ledger, month, [t.pk for t in teams])
                for team in teams:
                    self._reset_one(request, ledger, team, first_day(month))
        except (RedisError, LockError) as exc:
            self.message_user(request, f"Reset failed: {exc}", messages.ERROR)
            return None
        self.message_user(
            request, f"Reset this period's usage of {len(teams)} team(s); the usage "
            "forgiven is in each team's history.",
        )  # fmt: skip
        return None

    def _reset_one(self, request: HttpRequest, ledger: Any, team: Team, period: date) -> None:
        before = ledger.reset_team(team.pk)
        row = TeamUsageSnapshot.objects.filter(team=team, period=period).first()
        forgiven = "nothing settled"
        if row is not None:
            forgiven = f"{row.requests:,} requests, {row.base_tokens:,} base tokens " + (
                f"(${cost_usd(row.base_tokens)})"
            )
            TeamUsageSnapshot.objects.filter(pk=row.pk).update(
                requests=0, input_tokens=0, output_tokens=0, base_tokens=0,
                by_member={}, by_model={}, day_base_tokens=0,
            )  # fmt: skip
        self.log_change(
            request, team, f"Reset the team's usage of {period:%B %Y} "
            f"({before:,} base tokens): {forgiven}.",
        )  # fmt: skip

    def _reset_confirmation(self, request: HttpRequest, teams: list[Team]) -> HttpResponse:
        rows = []
        for team in teams:
            report = self._report(team)
            usage = None if report is None else report["usage"]
            rows.append(
                (team, "—" if usage is None else f"{usage['tokens_today']:,}",
                 "—" if usage is None else f"{usage['tokens_this_month']:,}")
            )  # fmt: skip
        context = {
            **self.admin_site.each_context(request),
            "title": "Reset this period's usage?",
            "opts": self.model._meta,
            "rows": rows,
            "queryset": teams,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/llm_quota/team/reset_confirmation.html", context)

    @admin.action(description="Resume: end the burn-rate pause", permissions=["change"])
    def resume_paused(self, request: HttpRequest, queryset: QuerySet[Team]) -> None:
        _resume_payers(self, request, queryset, lambda ledger, t: runaway.resume_team(ledger, t.pk))

    @admin.display(description="members")
    def member_count(self, team: Team) -> int:
        return team.memberships.count()

    @admin.display(description="tokens this month")
    def tokens_this_month(self, team: Team) -> Any:
        report = self._report(team)
        return "?" if report is None else f"{report['usage']['tokens_this_month']:,}"

    @admin.display(description="live usage")
    def live_usage(self, team: Team) -> Any:
        report = self._report(team)
        if report is None:
            return "-"
        usage, remaining = report["usage"], report["remaining"]
        members = format_html_join(
            "", "<li>{}: {} base tokens in {} requests</li>",
            ((m["user"]["username"] or m["user"]["id"], m["base_tokens"], m["requests"])
             for m in report["by_member"]),
        )  # fmt: skip
        return format_html(
            "{} base tokens today, {} this month ({} reserved, {} calls in flight); left this "
            "month: {}.<ul>{}</ul>",
            usage["tokens_today"], usage["tokens_this_month"], usage["reserved"],
            usage["in_flight"],
            "∞" if remaining["tokens_per_month"] is None else remaining["tokens_per_month"],
            members,
        )  # fmt: skip


@admin.register(TeamUsageSnapshot)
class TeamUsageSnapshotAdmin(admin.ModelAdmin):
    """Teams' months as the snapshot task copied them: read-only, like users'."""

    list_display = ("team", "month", "requests", "base_tokens", "day", "day_base_tokens",
                    "updated_at")  # fmt: skip
    list_select_related = ("team",)
    search_fields = ("team__slug", "team__name")
    date_hierarchy = "period"

    # Snapshots are written by the snapshot task (and zeroed by a team reset) only.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="month", ordering="period")
    def month(self, row: TeamUsageSnapshot) -> str:
        return f"{row.period:%b %Y}"
