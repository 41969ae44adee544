"""Deprecated import path: use ``llm_quota.gateway.async_views``."""

import warnings

from llm_quota.gateway.async_views import AsyncChatCompletionsView, warm_up

warnings.warn(
    "llm_quota.async_gateway is deprecated; import from llm_quota.gateway.async_views.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["AsyncChatCompletionsView", "warm_up"]
