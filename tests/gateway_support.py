"""Helpers for driving the gateway with the openai SDK (fixtures: tests/gateway/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openai

from llm_quota.redis_ledger import get_ledger
from llm_quota.tokens import ScopedTokenObtainPairSerializer

MSGS = [{"role": "user", "content": "Say hello in five words."}]


def access_token(user: Any) -> str:
    return str(ScopedTokenObtainPairSerializer.get_token(user).access_token)


@dataclass
class Gateway:
    base_url: str

    def client(self, user: Any, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key=access_token(user), **kwargs)

    @staticmethod
    def usage(user: Any):
        return get_ledger().usage(user.pk)

    @staticmethod
    def model_usage(user: Any, model: str):
        rows = [row for row in get_ledger().usage(user.pk).by_model if row.model == model]
        return rows[0] if rows else None
