from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class LLMQuotaConfig(AppConfig):
    name = "llm_quota"
    verbose_name = "LLM quota"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from llm_quota import checks  # noqa: F401  (registers the system checks)
        from llm_quota.alerts import on_quota_refused
        from llm_quota.models import ModelPrice, Tier, UserQuota
        from llm_quota.policy import invalidate
        from llm_quota.signals import quota_refused

        quota_refused.connect(on_quota_refused, dispatch_uid="llmq-budget-alert")
        for model in (Tier, ModelPrice, UserQuota):
            post_save.connect(invalidate, sender=model, dispatch_uid=f"llmq-save-{model.__name__}")
            post_delete.connect(invalidate, sender=model, dispatch_uid=f"llmq-del-{model.__name__}")
