"""Deprecated import path: use ``llm_quota.drf.throttling``, where the DRF adapters live."""

import warnings

from llm_quota.drf.throttling import LLMQuotaThrottle

warnings.warn(
    "llm_quota.throttling is deprecated; import LLMQuotaThrottle from llm_quota.drf.throttling.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["LLMQuotaThrottle"]
