from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class LLMQuotaConfig(AppConfig):
    name = "llm_quota"
    verbose_name = "LLM quota"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model

        from llm_quota import checks  # noqa: F401  (registers the system checks
        from llm_quota.ledger.config_broadcast import config_changed, listener, user_changed
        from llm_quota.models import ApiKey, ModelPrice, Team, TeamMembership, Tier, UserQuota
        from llm_quota.quota.alerts import on_burn_rate_tripped, on_quota_refused
        from llm_quota.rules.config_cache import config_cache
        from llm_quota.signals import burn_rate_tripped, quota_refused

        quota_refused.connect(on_quota_refused, dispatch_uid="llmq-budget-alert")
        burn_rate_tripped.connect(on_burn_rate_tripped, dispatch_uid="llmq-burn-alert")
        # An API key is cached with its user: a revocation, or a user deactivated, is
        # announced like a tier edit (a login's last_login update is not).
        for model in (Tier, ModelPrice, UserQuota, ApiKey, Team, TeamMembership):
            post_save.connect(
                config_changed, sender=model, dispatch_uid=f"llmq-save-{model.__name__}"
            )
            post_delete.connect(
                config_changed, sender=model, dispatch_uid=f"llmq-del-{model.__name__}"
            )
        post_save.connect(user_changed, sender=get_user_model(), dispatch_uid="llmq-save-user")
        post_delete.connect(config_changed, sender=get_user_model(), dispatch_uid="llmq-del-user")
        # Started lazily on the first read, in each process: threads don't survive the
        # fork of a preloading gunicorn or a prefork Celery pool.
        config_cache.before_read = listener.ensure_running
