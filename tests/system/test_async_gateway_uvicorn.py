"""The async gateway under real uvicorn workers: 64 concurrent streamed calls.

The project's own ASGI app (``project.asgi``, which turns ``ASYNC_GATEWAY`` on) is
served by 2 uvicorn workers sharing this test's Redis key prefix and a database file,
in front of the tests' own upstream server. A burst of 64 streamed calls goes to a
user whose monthly budget fits exactly ``ADMITTED`` of them. The upstream holds every
stream after its first chunk until all 64 have been answered 200 or 429, so every
admission is decided while all admitted calls still hold their reservations: exactly
``floor(budget / estimate)`` may pass. Meanwhile a ticker on each worker's event loop
records its largest gap: a blocking Redis, ORM or upstream call would show there.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from llm_quota.ledger.sync_driver import Ledger
from tests.support import fake_upstream
from tests.support.fake_upstream import UpstreamServer
from tests.support.gateway import MSGS
from tests.system.test_many_processes import (
    admin,
    every_worker,
    migrated_site,
    serving,
    spare_port,
    uvicorn,
)

pytestmark = pytest.mark.slow

CALLERS, ADMITTED, CAP = 64, 20, 30
#: The loop may be busy relaying 64 streams, but never stuck: a blocking call would
#: hold it for the length of a Redis round trip under load or an upstream read. This
#: is a behavioural bound, not a speed (that is ``make bench``'s business). It is
#: checked on the heartbeat's ``max_stall``: the wall-clock gap less the time the
#: kernel kept the loop's thread waiting for a CPU that other processes held (on a
#: shared 2-core machine that alone can exceed this bound).
LONGEST_GAP = 0.25


@pytest.fixture
def site(tmp_path, quota_prefix, upstream):
    env = migrated_site(tmp_path)
    return {**env, "LLM_QUOTA_KEY_PREFIX": quota_prefix, "SCALE_PREFIX": quota_prefix,
            "OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "sk-gateway-key"}  # fmt: skip


async def burst(url: str, token: str, upstream: UpstreamServer) -> list[tuple[int, bytes]]:
    """``CALLERS`` streamed calls at once; the upstream is let go once all have answered."""
    body = {"model": "up-hold", "messages": MSGS, "max_tokens": CAP, "stream": True}
    headers = {"Authorization": f"Bearer {token}"}
    answered = asyncio.Event()
    waiting = [CALLERS]
    limits = httpx.Limits(max_connections=CALLERS)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def call() -> tuple[int, bytes]:
            async with client.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                waiting[0] -= 1
                if not waiting[0]:
                    answered.set()
                return response.status_code, await response.aread()

        calls = [asyncio.create_task(call()) for _ in range(CALLERS)]
        await asyncio.wait_for(answered.wait(), 60)
        upstream.hold.set()
        return await asyncio.gather(*calls)


def test_uvicorn_streams_64_concurrent_calls_admitting_exactly_with_the_loop_never_blocked(
    site, quota_prefix, redis_client, upstream
):
    admin(site, "price", "up-*", "1", "2")
    estimate = int(admin(site, "estimate", "up-hold", str(CAP), json.dumps(MSGS)))
    budget = ADMITTED * estimate
    pk = admin(site, "seed", f"{quota_prefix}-streams", f"tokens_per_month={budget}")
    token = admin(site, "token", pk)
    port = spare_port()
    app = "project.asgi:application"
    with serving(uvicorn(site, 2, port, app=app), site, port, "/heartbeat/") as url:
        ready = every_worker(f"{url}/heartbeat/?reset=1", 2)  # both loops ticking from here
        answers = asyncio.run(burst(url, token, upstream))
        beats = every_worker(f"{url}/heartbeat/", 2)
    assert all(worker["async_gateway"] for worker in ready.values())

    streamed = [body for status, body in answers if status == 200]
    refused = [json.loads(body) for status, body in answers if status == 429]
    assert len(streamed) == budget // estimate == ADMITTED
    assert len(refused) == CALLERS - ADMITTED
    assert {error["error"]["limit"] for error in refused} == {"tokens_per_month"}
    for body in streamed:  # every admitted stream ran to its end
        assert body.count(b'"content"') == min(CAP, fake_upstream.WORDS)
        assert body.endswith(b"data: [DONE]\n\n")

    usage = Ledger(redis_client, prefix=quota_prefix).usage(pk)
    assert usage.reserved == 0 and usage.in_flight == 0
    charged = fake_upstream.PROMPT + 2 * min(CAP, fake_upstream.WORDS)  # up-* costs 1 in, 2 out
    assert usage.tokens_this_month == ADMITTED * charged <= budget  # zero overspend
    assert [(row.model, row.requests) for row in usage.by_model] == [("up-hold", ADMITTED)]

    gaps = {pid: (round(beat["max_gap"], 3), round(beat["max_stall"], 3))
            for pid, beat in beats.items()}  # fmt: skip
    print(f"uvicorn async gateway, {CALLERS} streams: largest loop gap (wall, own) {gaps}")
    assert max(beat["max_stall"] for beat in beats.values()) < LONGEST_GAP, gaps


def test_uvicorn_client_leaving_mid_stream_is_charged_what_was_generated(
    site, quota_prefix, redis_client, upstream
):
    admin(site, "price", "up-*", "1", "2")
    pk = admin(site, "seed", f"{quota_prefix}-leaves", "tokens_per_month=100000")
    token = admin(site, "token", pk)
    body = {"model": "up-trickle", "messages": MSGS, "max_tokens": fake_upstream.WORDS,
            "stream": True}  # fmt: skip
    ledger = Ledger(redis_client, prefix=quota_prefix)
    port = spare_port()
    with serving(uvicorn(site, 1, port, app="project.asgi:application"), site, port,
                 "/heartbeat/") as url:  # fmt: skip
        received = 0
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=30) as client:
            with client.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    received += line.startswith("data: ")
                    if received == 3:
                        break  # hang up mid-stream
        # uvicorn tells Django, which cancels the request: the relay settles at once.
        for _ in range(200):
            if not ledger.usage(pk).reserved:
                break
            time.sleep(0.05)
    usage = ledger.usage(pk)
    assert usage.reserved == 0 and usage.in_flight == 0
    [row] = usage.by_model
    assert row.requests == 1
    assert received <= row.output_tokens <= upstream.sent["up-trickle"] < fake_upstream.WORDS
