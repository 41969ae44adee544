"""Deprecated URLconf path: include ``llm_quota.gateway.urls`` instead."""

import warnings

from llm_quota.gateway.urls import urlpatterns

warnings.warn(
    "llm_quota.gateway_urls is deprecated; include llm_quota.gateway.urls.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["urlpatterns"]
