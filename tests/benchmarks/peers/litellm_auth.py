"""LiteLLM's ``custom_auth`` hook for the peers bench: per-key limits without a database.

LiteLLM keeps keys and their limits in PostgreSQL through Prisma; the bench runs it with
no database, so this hook stands in for the key table. Every ``sk-bench-*`` key gets
the same generous rpm/tpm and parallel-request limits that section 10's tier gives
our users, so LiteLLM's limiter does its per-key counting on every request, as ours
does, and never refuses. Loaded by LiteLLM (``general_settings.custom_auth``) from
its own virtualenv; nothing in the app imports it.
"""

from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth

RPM, TPM, PARALLEL = 10**6, 10**9, 10**4


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    if not api_key.startswith("sk-bench-"):
        raise Exception("unknown key")  # LiteLLM answers 401
    return UserAPIKeyAuth(
        api_key=api_key, rpm_limit=RPM, tpm_limit=TPM, max_parallel_requests=PARALLEL
    )
