"""Making API keys in tests, as the endpoint does (the plaintext, shown once)."""

from __future__ import annotations

from typing import Any

from llm_quota.models import ApiKey


def api_key(user: Any, name: str = "script", **fields: Any) -> tuple[ApiKey, str]:
    key = ApiKey(user=user, name=name, **fields)
    plaintext = key.issue()
    key.save()
    return key, plaintext
