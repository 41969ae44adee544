"""``llm_quota.authentication.ApiKeyAuthentication``: the contract's import path (section
9) for host projects' DRF settings; the class lives with the other DRF adapters."""

from llm_quota.drf.api_keys import ApiKeyAuthentication

__all__ = ["ApiKeyAuthentication"]
