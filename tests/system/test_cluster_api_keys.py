"""API keys on a real 3-primary Redis Cluster: a key's counters share its user's slot,
so the key is checked in the user's own reserve step; a global cap's refusal in the
second step withdraws the key's share too (``amend.lua``)."""

from __future__ import annotations

import inspect

import pytest

from llm_quota.ledger import keys
from llm_quota.rules.accounting import Limits
from tests.integration import test_key_ledger, test_payer_burn_rate
from tests.support.factories import estimate

pytestmark = pytest.mark.slow

PORTED = [
    name for name, fn in inspect.getmembers(test_key_ledger, inspect.isfunction)
    if name.startswith("test_")
]  # fmt: skip


@pytest.mark.parametrize("case", PORTED)
def test_single_redis_key_behaviour_holds_on_the_cluster(case, cluster_ledger, clock):
    test = getattr(test_key_ledger, case)
    available = {"ledger": cluster_ledger, "clock": clock}
    test(**{name: available[name] for name in inspect.signature(test).parameters})


BURN_PORTED = [
    name for name, fn in inspect.getmembers(test_payer_burn_rate, inspect.isfunction)
    if name.startswith("test_") and "key" in name and "week" not in name
]  # fmt: skip


@pytest.mark.parametrize("case", BURN_PORTED)
def test_a_keys_burn_rate_breaker_holds_on_the_cluster(case, cluster_ledger, clock):
    """The key's breaker is checked in its user's own reserve step, in the same slot."""
    test = getattr(test_payer_burn_rate, case)
    available = {"ledger": cluster_ledger, "clock": clock}
    test(**{name: available[name] for name in inspect.signature(test).parameters})


def test_a_keys_counters_live_in_its_users_slot(cluster_ledger):
    for uid in (1, 42, 977):
        user, key = cluster_ledger.keyspace.user(uid), cluster_ledger.keyspace.api_key(uid, 5)
        assert keys.cluster_slot(user) == keys.cluster_slot(key)


def test_a_global_refusal_withdraws_the_keys_share_with_the_users(cluster_ledger):
    limits = Limits(global_tokens_per_day=1000, api_key="3", key_tokens_per_month=10_000)
    assert cluster_ledger.reserve(1, limits, estimate(900, 0)).allowed
    refused = cluster_ledger.reserve(1, limits, estimate(500, 0), clamp=False)
    assert not refused.allowed and refused.limit == "global_tokens_per_day"
    key = cluster_ledger.key_usage(1, "3")
    assert (key.tokens_this_month, key.reserved, key.requests_this_minute) == (900, 900, 1)


def test_a_global_clamp_lowers_the_keys_share_with_the_users(cluster_ledger):
    limits = Limits(global_tokens_per_day=500, api_key="3", key_tokens_per_month=10_000)
    decision = cluster_ledger.reserve(1, limits, estimate(100, 1000))
    assert decision.allowed and decision.reservation.reserved == 500
    key = cluster_ledger.key_usage(1, "3")
    assert key.reserved == 500 == cluster_ledger.usage(1).reserved
