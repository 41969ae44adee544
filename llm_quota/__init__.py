"""django-llm-quota: per-user LLM token quotas and rate limits, enforced in Redis."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see (exported: "as"); at run time, __getattr__
    from llm_quota.quota.guard import QuotaGuard as QuotaGuard
    from llm_quota.quota.guard import quota_guard as quota_guard

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package never imports Django models early.
    if name in ("quota_guard", "QuotaGuard"):
        from llm_quota.quota import guard

        return getattr(guard, name)
    raise AttributeError(name)
