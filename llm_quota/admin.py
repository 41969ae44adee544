"""The admin: tiers and prices edited with validation, quotas with live usage from
Redis and actions, read-only snapshots with CSV export, and a usage page with charts.

Live figures come from Redis in one pipelined round trip per change-list page; the
charts and the CSV read ``UsageSnapshot`` (one query each), which lags Redis by up
to one ``SNAPSHOT_INTERVAL``: the page says by how much.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timesince
from redis.exceptions import LockError, RedisError

from llm_quota.conf import quota_settings
from llm_quota.forms import ModelPriceForm, TierForm
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import UserUsage
from llm_quota.models import ModelPrice, Tier, UsageSnapshot, UserQuota
from llm_quota.reporting import charts, snapshot_totals
from llm_quota.reporting.cost import cost_usd
from llm_quota.reporting.snapshot import last_run, snapshot_users
from llm_quota.reporting.snapshot_csv import csv_rows
from llm_quota.rules.periods import add_months, first_day

# -- tiers and prices ------------------------------------------------------------------


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    form = TierForm
    list_display = (
        "name", "requests_per_minute", "tokens_per_minute", "tokens_per_day",
        "tokens_per_month", "max_concurrent_requests", "soft_limit_percent", "is_default",
    )  # fmt: skip
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "is_default", "scopes")}),
        (
            "Limits (base tokens; empty = unlimited)",
            {
                "fields": (
                    ("requests_per_minute", "max_concurrent_requests"),
                    ("tokens_per_minute", "tokens_per_day", "tokens_per_month"),
                    "max_tokens_per_request",
                    "soft_limit_percent",
                )
            },
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


def _usd_per_million(multiplier: Decimal | None) -> str:
    """A multiplier as dollars per million tokens (multiplier x the base token's price)."""
    if multiplier is None:
        return "—"
    rate = Decimal(str(quota_settings.BASE_TOKEN_USD_PER_MILLION))
    return f"${(Decimal(multiplier) * rate).normalize():,f}"


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Prices are stored as multipliers of one *base token*, the unit every budget
    counts in; the list and the form show them in USD per million tokens too."""

    form = ModelPriceForm
    list_display = (
        "model", "input_usd", "output_usd", "input_multiplier", "output_multiplier",
        "cached_input_multiplier", "default_max_output_tokens", "context_window",
        "output_cap_field", "enabled",
    )  # fmt: skip
    list_filter = ("enabled",)
    search_fields = ("model",)

    @admin.display(description="input, USD / 1M tokens", ordering="input_multiplier")
    def input_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.input_multiplier)

    @admin.display(description="output, USD / 1M tokens", ordering="output_multiplier")
    def output_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.output_multiplier)

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form = super().get_form(request, obj, change, **kwargs)
        rate = quota_settings.BASE_TOKEN_USD_PER_MILLION
        base = (
            f"A base token is the unit every budget counts in; a million of them cost "
            f"${rate} (BASE_TOKEN_USD_PER_MILLION). A multiplier of 1 is ${rate} per million "
            "tokens, 4 is four times that."
        )
        for name in ("input_multiplier", "output_multiplier", "cached_input_multiplier"):
            field = form.base_fields.get(name)
            if field is None:
                continue
            now = (
                "" if obj is None else f" Now: {_usd_per_million(getattr(obj, name))} per million."
            )
            field.help_text = f"{base}{now}"
        return form


# -- quotas with live usage -------------------------------------------------------------


def _left_of(budget: int | None, live: UserUsage) -> str:
    return "unlimited" if budget is None else f"{max(0, budget - live.tokens_this_month):,}"


def _share_of(budget: int, live: UserUsage) -> float:
    """Percent of the monthly budget used (reserved tokens included)."""
    return 100.0 * live.tokens_this_month / budget


def _percent_bar(percent: float) -> str:
    color = "#D55E00" if percent >= 100 else "#E69F00" if percent >= 80 else "#009E73"
    return format_html(
        '<span title="{}%" style="display:inline-block;width:80px;height:8px;'
        'background:rgba(127,127,127,.25);vertical-align:middle">'
        '<span style="display:block;height:8px;width:{}px;background:{}"></span></span> {}%',
        f"{percent:.1f}", min(80, round(percent * 0.8)), color, f"{percent:.0f}",
    )  # fmt: skip


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = (
        "user", "tier", "blocked", "used_this_month", "reserved", "remaining", "budget_used",
    )  # fmt: skip
    list_filter = ("tier", "blocked")
    list_select_related = ("user", "tier")
    raw_id_fields = ("user",)
    search_fields = ("user__username",)
    readonly_fields = ("live_usage",)
    actions = ("block_users", "unblock_users", "reset_period_usage")

    # Live usage: fetched for the whole page at once, then read by the columns.
    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None) or {}
        cl = context.get("cl")
        if cl is not None:
            quotas = list(cl.result_list)
            try:
                live = get_ledger().usage_many([q.user_id for q in quotas])
            except RedisError as exc:
                self.message_user(request, f"Redis is unavailable: {exc}", messages.ERROR)
                live = {}
            for quota in quotas:
                quota._live = live.get(str(quota.user_id))
        return response

    @staticmethod
    def _live(quota: UserQuota) -> UserUsage | None:
        return getattr(quota, "_live", None)

    @admin.display(description="used this month")
    def used_this_month(self, quota: UserQuota) -> Any:
        live = self._live(quota)
        return "—" if live is None else f"{live.tokens_this_month:,}"

    @admin.display(description="reserved")
    def reserved(self, quota: UserQuota) -> Any:
        live = self._live(quota)
        return "—" if live is None else f"{live.reserved:,}"

    @admin.display(description="remaining")
    def remaining(self, quota: UserQuota) -> Any:
        live = self._live(quota)
        return "—" if live is None else _left_of(quota.monthly_budget, live)

    @admin.display(description="% of budget")
    def budget_used(self, quota: UserQuota) -> Any:
        live, budget = self._live(quota), quota.monthly_budget
        if live is None or not budget:
            return "—"
        return _percent_bar(_share_of(budget, live))

    @admin.display(description="live usage (Redis)")
    def live_usage(self, quota: UserQuota) -> Any:
        if quota.pk is None:
            return "—"
        ledger = get_ledger()
        try:
            live = ledger.usage(quota.user_id)
            now_ms = ledger.now_ms()
            run = last_run()
        except RedisError as exc:
            return f"Redis is unavailable: {exc}"
        budget = quota.monthly_budget
        period = first_day(live.month)
        stored = sum(
            UsageSnapshot.objects.filter(user_id=quota.user_id, period=period).values_list(
                "base_tokens", flat=True
            )
        )
        at_risk = max(0, live.settled_this_month - stored)
        rows = [
            ("Period", f"{period:%B %Y}"),
            ("Used this month (incl. reserved)", f"{live.tokens_this_month:,}"),
            (
                "Share of the monthly budget",
                "—" if not budget else f"{_share_of(budget, live):.1f}%",
            ),
            ("Used today", f"{live.tokens_today:,}"),
            ("The day's budget starts again in", _duration((live.day_end_ms - now_ms) / 1000)),
            ("The month's budget starts again in", _duration((live.month_end_ms - now_ms) / 1000)),
            ("Reserved by calls in flight", f"{live.reserved:,} ({live.in_flight} calls)"),
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
        self.log_change(
            request, quota, f"Reset the usage of {period:%B %Y} "
            f"({reset.tokens_before:,} base tokens): {forgiven or 'nothing settled'}.",
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


def _duration(seconds: float) -> str:
    """A wait or an age as a person reads it ("1 day, 3 hours", not "97143 s"):
    Django's ``timesince``, two units deep; under a minute, in seconds."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    now = datetime.now(UTC)
    return timesince(now - timedelta(seconds=seconds), now, depth=2)


def _run_age(run: dict[str, Any] | None) -> str:
    if run is None:
        return "none recorded (none yet, or Redis lost it) — check the Celery beat"
    age = time.time() - run["recorded_at"]
    return (
        f"{_duration(age)} ago: {run['users']} users read, {run['rows_written']} rows written "
        f"(every {_duration(quota_settings.SNAPSHOT_INTERVAL)})"
    )


# -- snapshots, charts and CSV ----------------------------------------------------------


@admin.register(UsageSnapshot)
class UsageSnapshotAdmin(admin.ModelAdmin):
    list_display = (
        "user", "period", "model", "requests", "input_tokens", "output_tokens",
        "base_tokens", "cost", "updated_at",
    )  # fmt: skip
    list_filter = ("period", "model", ("user__llm_quota__tier", admin.RelatedOnlyFieldListFilter))
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

    @admin.display(description="cost (USD)")
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

    def _current_period(self) -> date:
        ledger = get_ledger()
        moment = ledger.clock() if ledger.clock is not None else time.time()
        return first_day(ledger.periods(int(moment * 1000))[1])

    def report_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        period = self._current_period()
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
                (u.username, u.base_tokens, "" if u.percent is None else f"({u.percent:.0f}%)")
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
            "snapshot_interval": _duration(quota_settings.SNAPSHOT_INTERVAL),
            "total_cost": cost_usd(sum(m.base_tokens for m in models)),
            "csv_url": reverse("admin:llm_quota_usage_csv"),
            "quota_url": reverse("admin:llm_quota_userquota_changelist"),
        }
        return TemplateResponse(request, "admin/llm_quota/usagesnapshot/report.html", context)

    def report_csv_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        queryset = UsageSnapshot.objects.all()
        months = request.GET.get("months")
        if months and months.isdigit():
            queryset = queryset.filter(
                period__gte=add_months(self._current_period(), 1 - int(months))
            )
        return _csv_response(queryset, "llm-usage.csv")


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
    fields = ("period", "requests", "input_tokens", "output_tokens", "base_tokens", "updated_at")
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
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "prefix", "user__username")
    raw_id_fields = ("user",)
    list_per_page = 50
    actions = ["revoke_keys"]
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
        if not hasattr(key, "_live"):
            try:
                key._live = key_usage_report(key)
            except RedisError:
                key._live = None
        return key._live

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


# -- teams (contract section 10) ---------------------------------------------------------
# Members inline; the change list and page show the team's live usage from Redis.

from llm_quota.models import Team, TeamMembership  # noqa: E402
from llm_quota.reporting.team_usage import team_usage_report  # noqa: E402
from llm_quota.rules.teams import team_policy  # noqa: E402


class TeamMembershipInline(admin.TabularInline):
    model = TeamMembership
    raw_id_fields = ("user",)
    extra = 1


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "tier", "member_count", "tokens_this_month", "blocked")
    list_filter = ("tier", "blocked")
    search_fields = ("slug", "name")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [TeamMembershipInline]
    readonly_fields = ("live_usage",)
    fieldsets = (
        (None, {"fields": ("slug", "name", "tier", "blocked")}),
        ("Overrides of the tier (empty: the tier's; 0: unlimited)", {
            "fields": (("requests_per_minute", "max_concurrent_requests"),
                       ("tokens_per_day", "tokens_per_month"), "max_tokens_per_request"),
        }),
        ("Live usage", {"fields": ("live_usage",)}),
    )  # fmt: skip

    @staticmethod
    def _report(team: Team) -> dict[str, Any] | None:
        if not team.pk:
            return None
        if not hasattr(team, "_live"):
            policy = team_policy(team.pk)
            try:
                team._live = team_usage_report(policy) if policy else None
            except RedisError:
                team._live = None
        return team._live

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
