"""The contract's import paths for host projects' DRF settings:
``llm_quota.authentication.ApiKeyAuthentication`` (section 9) and
``CachedJWTAuthentication`` (simplejwt's, its user from the config cache); the
classes live with the other DRF adapters."""

from llm_quota.drf.api_keys import ApiKeyAuthentication
from llm_quota.drf.jwt import CachedJWTAuthentication

__all__ = ["ApiKeyAuthentication", "CachedJWTAuthentication"]
