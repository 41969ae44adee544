"""Opt-in test doubles: ``FakeProvider``, an upstream with no network.

Opt in with ``LLM_QUOTA["UPSTREAM"] = "llm_quota.testing.FakeProvider"``.
"""

from llm_quota.testing.fake_provider import FakeProvider

__all__ = ["FakeProvider"]
