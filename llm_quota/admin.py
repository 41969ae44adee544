"""Plain registrations; the full admin (live usage, actions, charts) builds on these."""

from django.contrib import admin

from llm_quota.models import ModelPrice, Tier, UsageSnapshot, UserQuota


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = (
        "name", "requests_per_minute", "tokens_per_minute", "tokens_per_day",
        "tokens_per_month", "max_concurrent_requests", "is_default",
    )  # fmt: skip
    search_fields = ("name",)


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ("model", "input_multiplier", "output_multiplier", "context_window", "enabled")
    list_filter = ("enabled",)
    search_fields = ("model",)


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ("user", "tier", "blocked")
    list_filter = ("tier", "blocked")
    raw_id_fields = ("user",)
    search_fields = ("user__username",)


@admin.register(UsageSnapshot)
class UsageSnapshotAdmin(admin.ModelAdmin):
    list_display = ("user", "period", "model", "requests", "base_tokens", "updated_at")
    list_filter = ("period", "model")
    date_hierarchy = "period"
