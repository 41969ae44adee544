"""``manage.py check`` reports misconfiguration."""

from __future__ import annotations

import pytest

from llm_quota.checks import check_gateway, check_settings, check_tiers, check_token_endpoint
from llm_quota.conf import SETTINGS
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


def test_each_declared_rule_reports_its_setting_by_name(settings):
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "FAIL_OPEN": "yes",
        "DEFAULT_TIER": 3,
        "MIN_OUTPUT_TOKENS": 0,
        "BASE_TOKEN_USD_PER_MILLION": "two",
        "CONFIG_CACHE_SECONDS": -1,
    }
    found = {e.id: e.msg for e in check_settings()}
    assert found["llm_quota.E040"].startswith("LLM_QUOTA['FAIL_OPEN'] must be True or False")
    assert found["llm_quota.E041"].startswith("LLM_QUOTA['DEFAULT_TIER']")
    assert {"llm_quota.E042", "llm_quota.E043", "llm_quota.E044"} <= set(found)


def test_every_setting_is_declared_once_with_a_doc_and_a_check_id():
    names = [setting.name for setting in SETTINGS]
    assert len(names) == len(set(names))
    for setting in SETTINGS:
        assert setting.doc and "\n" not in setting.doc, setting.name
        assert bool(setting.rule) == bool(setting.check_id), setting.name
        if setting.rule:
            assert setting.rule.accepts(setting.default), setting.name


def test_upstream_must_name_an_importable_class(settings):
    for bad in ("nowhere.Upstream", "llm_quota.conf.quota_settings", 42):
        settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UPSTREAM": bad}
        assert "llm_quota.E016" in ids(check_gateway()), bad
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "UPSTREAM": "llm_quota.testing.fake_provider.FakeProvider",
    }
    assert check_gateway() == []


def test_a_mounted_gateway_without_an_upstream_fails_the_check(settings):
    quota = {
        k: v for k, v in settings.LLM_QUOTA.items() if k not in ("UPSTREAM", "OPENAI_BASE_URL")
    }
    settings.LLM_QUOTA = quota
    assert ids(check_gateway()) == {"llm_quota.E017"}
    settings.LLM_QUOTA = {**quota, "OPENAI_BASE_URL": "https://api.example/v1"}
    assert check_gateway() == []
    settings.LLM_QUOTA = quota
    settings.ROOT_URLCONF = "llm_quota.reporting.urls"  # a project without the gateway
    assert check_gateway() == []


def test_the_moved_token_setting_warns_where_it_went(settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "TOKEN_REQUESTS_PER_MINUTE": 5}
    warnings = [e for e in check_settings() if e.id.startswith("llm_quota.W")]
    assert [w.id for w in warnings] == ["llm_quota.W050"]
    assert 'DEFAULT_THROTTLE_RATES"]["llm_quota_token"]' in warnings[0].msg


@pytest.mark.parametrize("rate", ["5/hour", "1/s", "lots", "5/", "0/minute"])
def test_a_token_endpoint_rate_that_is_not_per_minute_fails_the_check(settings, rate):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"llm_quota_token": rate},
    }
    assert ids(check_token_endpoint()) == {"llm_quota.E050"}


@pytest.mark.parametrize("rate", ["5/minute", "30/min", "9/m", None])
def test_a_token_endpoint_rate_per_minute_or_none_passes(settings, rate):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"llm_quota_token": rate},
    }
    assert check_token_endpoint() == []
