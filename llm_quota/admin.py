"""The admin: tiers and prices edited with validation, quotas with live usage from
Redis and actions, read-only snapshots with CSV export, and a usage page with charts.

Live figures come from Redis in one pipelined round trip per change-list page; the
charts and the CSV read ``UsageSnapshot`` (one query each), which lags Redis by up
to one ``SNAPSHOT_INTERVAL``: the page says by how much.
"""

from __future__ import annotations

import time
from datetime import date
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
from redis.exceptions import LockError, RedisError

from llm_quota.conf import quota_settings
from llm_quota.durations import human_duration
from llm_quota.forms import ModelPriceForm, TierForm, base_token_usd, usd_per_million
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
        "model", "input_usd", "output_usd", "cached_input_usd", "input_multiplier",
        "output_multiplier", "default_max_output_tokens", "context_window", "enabled",
    )  # fmt: skip
    list_filter = ("enabled",)
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

    @admin.display(description="input, USD / 1M tokens", ordering="input_multiplier")
    def input_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.input_multiplier)

    @admin.display(description="output, USD / 1M tokens", ordering="output_multiplier")
    def output_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.output_multiplier)

    @admin.display(description="cached input, USD / 1M", ordering="cached_input_multiplier")
    def cached_input_usd(self, price: ModelPrice) -> str:
        return _usd_per_million(price.cached_input_multiplier)


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
            ("The day's budget starts again in", human_duration((live.day_end_ms - now_ms) / 1000)),
            (
                "The month's budget starts again in",
                human_duration((live.month_end_ms - now_ms) / 1000),
            ),
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
            "snapshot_interval": human_duration(quota_settings.SNAPSHOT_INTERVAL),
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
