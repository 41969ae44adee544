"""``manage.py check`` reports misconfiguration."""

from __future__ import annotations

import pytest

from llm_quota.checks import check_settings, check_tiers
from tests.support import factories


def ids(errors):
    return {e.id for e in errors}


def test_default_settings_pass():
    assert check_settings() == []


def test_non_django_redis_cache_is_refused(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    assert "llm_quota.E003" in ids(check_settings())


def test_missing_alias_and_bad_values(settings):
    settings.LLM_QUOTA = {
        "REDIS_CACHE_ALIAS": "nope",
        "UNKNOWN_MODEL": "free",
        "PERIOD_TIMEZONE": "Mars/Base",
        "RESERVATION_TTL": 5,
        "GLOBAL_TOKENS_PER_DAY": -1,
        "KEY_PREFIX": "a b",
        "TYPO": 1,
    }
    assert {
        "llm_quota.E002",
        "llm_quota.E004",
        "llm_quota.E005",
        "llm_quota.E006",
        "llm_quota.E007",
        "llm_quota.E009",
        "llm_quota.W001",
    } <= ids(check_settings())


@pytest.mark.django_db
def test_tiers_check(settings):
    assert ids(check_tiers(databases=["default"])) == {"llm_quota.W002"}
    factories.tier("a", is_default=True)
    assert check_tiers(databases=["default"]) == []
    factories.tier("b", is_default=True)
    assert ids(check_tiers(databases=["default"])) == {"llm_quota.E010"}


def test_outage_settings_are_checked(settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "BREAKER_COOLDOWN": 0, "FAIL_OPEN_DIVISOR": 0}
    assert {"llm_quota.E030", "llm_quota.E031"} <= ids(check_settings())


def test_a_quota_cache_without_socket_timeouts_is_warned_about(settings):
    cache = dict(settings.CACHES["default"])
    cache["OPTIONS"] = {
        k: v for k, v in (cache.get("OPTIONS") or {}).items() if not k.startswith("SOCKET_")
    }
    settings.CACHES = {**settings.CACHES, "default": cache}
    assert "llm_quota.W030" in ids(check_settings())
