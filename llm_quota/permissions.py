"""Deprecated import path: use ``llm_quota.drf.permissions``, where the DRF adapters live."""

import warnings

from llm_quota.drf.permissions import HasScope

warnings.warn(
    "llm_quota.permissions is deprecated; import HasScope from llm_quota.drf.permissions.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["HasScope"]
