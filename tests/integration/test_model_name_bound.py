"""Names that only a pattern row prices are the caller's to invent (``up-*`` prices
``up-`` plus anything). Each distinct name would be four more fields in the month's
per-model hash and one more ``UsageSnapshot`` row, so past ``MODEL_NAMES_PER_MONTH``
names a month records them under the pattern: the records stay bounded, the totals
stay exact. Decided inside the settle script, so concurrent settles cannot overshoot.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections

from llm_quota import quota_guard
from llm_quota.ledger.restore import month_from_snapshots
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories

pytestmark = pytest.mark.django_db(transaction=True)

BOUND = 6
PROMPT, OUTPUT = 10, 5  # every call: 10 x 1 + 5 x 2 = 20 base tokens under "up-*"


@pytest.fixture
def bounded(settings, quota_prefix):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "MODEL_NAMES_PER_MONTH": BOUND}


@pytest.fixture
def user(bounded, ledger):
    factories.price("up-exact", "1", "2")
    factories.price("up-*", "1", "2")
    factories.tier("free", is_default=True)
    return factories.user()


def call(user, model: str) -> None:
    try:
        with quota_guard(user, model=model, prompt_tokens=PROMPT, max_tokens=OUTPUT) as quota:
            quota.settle({"prompt_tokens": PROMPT, "completion_tokens": OUTPUT})
    finally:
        connections.close_all()  # a worker thread's own database connection


def test_many_invented_names_are_bounded_in_redis_and_in_snapshots_with_exact_totals(
    user, ledger, redis_client
):
    names = [f"up-{i}" for i in range(60)]
    call(user, "up-exact")  # an exact row: always its own name, and one of the month's
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda name: call(user, name), names * 2))  # each name twice

    usage = ledger.usage(user.pk)
    by_model = {row.model: row for row in usage.by_model}
    own = {name for name in by_model if name not in ("up-exact", "up-*")}
    assert len(by_model) == BOUND + 1  # the month's names, then the pattern
    assert len(own) == BOUND - 1 and own <= set(names)
    assert all(by_model[name].requests == 2 for name in own)  # a recorded name stays its own
    assert by_model["up-exact"].requests == 1
    assert by_model["up-*"].requests == 2 * (len(names) - len(own))
    calls = 1 + 2 * len(names)
    assert sum(row.requests for row in usage.by_model) == calls
    assert sum(row.input_tokens for row in usage.by_model) == calls * PROMPT
    assert sum(row.output_tokens for row in usage.by_model) == calls * OUTPUT
    assert sum(row.base_tokens for row in usage.by_model) == usage.tokens_this_month
    assert usage.tokens_this_month == calls * (PROMPT + 2 * OUTPUT)
    assert usage.reserved == 0
    month_hash = ledger.keyspace.model_usage(user.pk, usage.month)
    assert redis_client.hlen(month_hash) == 4 * (BOUND + 1)

    snapshot_usage(ledger=ledger)
    rows = list(UsageSnapshot.objects.filter(user=user))
    assert sorted(row.model for row in rows) == sorted(by_model)
    assert sum(row.base_tokens for row in rows) == usage.tokens_this_month
    assert sum(row.requests for row in rows) == calls


def test_the_pattern_row_survives_a_restore_from_the_snapshots(user, ledger, redis_client, clock):
    for i in range(BOUND + 3):
        call(user, f"up-{i}")
    before = ledger.usage(user.pk)
    snapshot_usage(ledger=ledger)
    for key in redis_client.scan_iter(match=f"{ledger.keyspace.user(user.pk)}*"):
        redis_client.delete(key)  # Redis lost this user's counters

    durable = Ledger(
        redis_client, prefix=ledger.keyspace.prefix, clock=clock, restore=month_from_snapshots
    )
    after = durable.usage(user.pk)
    assert after.by_model == before.by_model
    assert "up-*" in {row.model for row in after.by_model}
    assert after.tokens_this_month == before.tokens_this_month
