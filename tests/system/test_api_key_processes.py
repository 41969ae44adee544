"""API keys across real processes: gunicorn workers that each cache the key.

A revocation made by another process (the admin's, the key endpoint's) reaches every
worker through the config broadcast, and a burst of calls with one key from many
clients at once, spread over the workers, never spends past the key's budget.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from llm_quota.ledger.sync_driver import Ledger
from tests.system.test_many_processes import (
    admin,
    gunicorn,
    serving,
    site,  # noqa: F401 - fixtures
    site_db,  # noqa: F401
    spare_port,
)

pytestmark = pytest.mark.slow

BODY = json.dumps(
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
).encode()


def chat(url: str, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=BODY, method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                 "Connection": "close"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def estimate(env: dict) -> int:
    messages = json.dumps([{"role": "user", "content": "hi"}])
    return int(admin(env, "estimate", "gpt-4o", "50", messages))


def test_a_key_revoked_in_one_process_is_refused_by_every_worker(site, quota_prefix):  # noqa: F811
    pk = admin(site, "seed", f"{quota_prefix}-rev", "requests_per_minute=1000")
    key_id, key = admin(site, "key", pk).split()
    port = spare_port()
    with serving(gunicorn(site, 3, port), site, port, f"/policy/{pk}/") as url:
        with ThreadPoolExecutor(max_workers=12) as pool:
            warm = list(pool.map(lambda _: chat(url, key)[0], range(36)))
        assert warm == [200] * 36  # every worker has the key cached now
        # Another process revokes it; each worker caches it for an hour
        # (CONFIG_CACHE_SECONDS): only the broadcast can tell them.
        admin(site, "revoke", key_id)
        with ThreadPoolExecutor(max_workers=12) as pool:
            after = list(pool.map(lambda _: chat(url, key), range(36)))
    assert [status for status, _ in after] == [401] * 36, after[:3]
    assert {body["error"]["code"] for _, body in after} == {"invalid_api_key"}


def test_a_burst_with_one_key_over_several_workers_never_overspends_its_budget(
    site,  # noqa: F811
    quota_prefix,
    redis_client,
):
    pk = admin(site, "seed", f"{quota_prefix}-burst", "tokens_per_month=100000000")
    cost = estimate(site)  # after the seed, which prices gpt-4o
    calls = 20
    limit = calls * cost + 10  # room for 20 calls; too little to clamp a 21st
    key_id, key = admin(site, "key", pk, f"tokens_per_month={limit}").split()
    port = spare_port()
    with serving(gunicorn(site, 3, port), site, port, f"/policy/{pk}/") as url:
        with ThreadPoolExecutor(max_workers=60) as pool:
            answers = list(pool.map(lambda _: chat(url, key), range(60)))
    statuses = [status for status, _ in answers]
    refused = [body for status, body in answers if status == 429]
    # At least the 20 calls the budget holds at their estimates; a few more where earlier
    # calls settled below their estimate (the fake provider writes fewer tokens).
    assert statuses.count(200) >= calls and statuses.count(200) + len(refused) == 60
    assert {("key.tokens_per_month" in body["error"]["message"]) for body in refused} == {True}
    ledger = Ledger(redis_client, prefix=quota_prefix)
    deadline = time.monotonic() + 5  # the last settles may trail the last answer a moment
    while ledger.key_usage(pk, key_id).reserved and time.monotonic() < deadline:
        time.sleep(0.05)
    used = ledger.key_usage(pk, key_id)
    assert used.reserved == 0 and used.tokens_this_month <= limit
    assert used.requests == statuses.count(200)
    # Every call the key made was charged to its user as well, and to nobody else.
    assert ledger.usage(pk).tokens_this_month == used.tokens_this_month
