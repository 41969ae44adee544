"""Driving the gateway with the openai and anthropic SDKs (its fixtures:
``tests/integration/gateway``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai

from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
from llm_quota.ledger.default import get_ledger

MSGS = [{"role": "user", "content": "Say hello in five words."}]


def access_token(user: Any) -> str:
    return str(ScopedTokenObtainPairSerializer.get_token(user).access_token)


@dataclass
class Gateway:
    base_url: str
    clients: list[Any] = field(default_factory=list)

    def client(self, user: Any, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=self.base_url, api_key=access_token(user), **kwargs)
        self.clients.append(client)
        return client

    def anthropic(self, user: Any, **kwargs: Any) -> anthropic.Anthropic:
        """The ``anthropic`` SDK on the gateway (it adds ``/v1`` itself), the access
        token as its ``api_key`` (sent as ``x-api-key``)."""
        kwargs.setdefault("max_retries", 0)
        root = self.base_url.removesuffix("/v1")
        client = anthropic.Anthropic(base_url=root, api_key=access_token(user), **kwargs)
        self.clients.append(client)
        return client

    def close(self) -> None:
        """Close the SDK's kept-alive connections, so the server threads (and their
        database connections) end with the test."""
        for client in self.clients:
            client.close()

    @staticmethod
    def usage(user: Any):
        return get_ledger().usage(user.pk)

    @staticmethod
    def model_usage(user: Any, model: str):
        rows = [row for row in get_ledger().usage(user.pk).by_model if row.model == model]
        return rows[0] if rows else None
