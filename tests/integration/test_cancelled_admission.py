"""A requester cancelled while Redis decides (a client gone, a timeout) leaves nothing
reserved: the reserve runs to its end and what it admitted is released at once,
instead of holding tokens and a concurrency slot for a whole RESERVATION_TTL."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.quota import admission
from llm_quota.rules.accounting import Limits
from llm_quota.rules.policy import UserPolicy
from tests.support.factories import estimate

# Busy for 400 ms of Redis' own time (a stand-in for a slow or loaded server).
BUSY = """
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + 400000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return 1
"""


def test_a_reserve_cancelled_in_flight_is_released_not_held(private_redis, quota_prefix):
    policy = UserPolicy(tier="t", limits=Limits(max_concurrent_requests=1, tokens_per_month=10**6))

    async def scenario():
        client = redis.asyncio.Redis(port=private_redis.port)
        ledger = AsyncLedger(client, prefix=quota_prefix)
        # One call first: scripts loaded, connection open, the user's counters known.
        first = await admission.aadmit(1, estimate(100, 100), policy=policy, ledger=ledger)
        await admission.arelease(first.reservation, ledger=ledger)
        # Keep Redis busy for a moment, so the cancellation lands after the reserve
        # was sent and before it ran; Redis still runs what is in its socket buffer.
        busy = asyncio.create_task(asyncio.to_thread(private_redis.client().eval, BUSY, 0))
        await asyncio.sleep(0.05)
        admitting = asyncio.create_task(
            admission.aadmit(1, estimate(100, 100), policy=policy, ledger=ledger)
        )
        await asyncio.sleep(0.1)
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        await busy
        await asyncio.sleep(0.2)  # the reserve has run; so has its release
        usage = await ledger.usage(1)
        again = await admission.aadmit(1, estimate(100, 100), policy=policy, ledger=ledger)
        await admission.arelease(again.reservation, ledger=ledger)
        await client.aclose()
        return usage

    usage = asyncio.run(scenario())
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 0)
