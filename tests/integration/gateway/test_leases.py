"""A call that outlives ``RESERVATION_TTL`` keeps its reservation while it runs: the
process's lease keeper renews it, so a concurrency-1 user cannot start a second call
beside it, and the call is settled exactly when it ends.

The ledger runs on Redis' own clock with a 2-second lease, and the upstream's
``up-long`` model takes ``LONG`` seconds to answer: three leases' worth.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from tests.support import factories
from tests.support.fake_upstream import PROMPT, WORDS
from tests.support.gateway import MSGS

pytestmark = pytest.mark.slow

TTL = 2.0
LONG = 3 * TTL


@pytest.fixture
def short_leases(gateway, upstream, settings, redis_client, quota_prefix, monkeypatch):
    """The project's ledger with a 2 s lease on Redis' clock (leases expire for real)."""
    from tests.support import fake_upstream

    monkeypatch.setattr(fake_upstream, "LONG", LONG)
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UPSTREAM_READ_TIMEOUT": 4 * LONG}
    ledger = Ledger(redis_client, prefix=quota_prefix, reservation_ttl=TTL)
    set_default_ledger(ledger)  # after the settings change, which drops the ledger
    yield ledger
    set_default_ledger(None)


@pytest.fixture
def single_call_user(short_leases):
    factories.tier("one-at-a-time", is_default=True, max_concurrent_requests=1)
    return factories.user()


def refused_beside(gateway, user) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as refused:
        gateway.client(user).chat.completions.create(
            model="up-normal", messages=MSGS, max_tokens=5
        )
    return refused.value


def assert_settled_exactly(ledger, user, output_tokens):
    usage = ledger.usage(user.pk)
    assert (usage.reserved, usage.in_flight) == (0, 0)
    (row,) = [row for row in usage.by_model if row.model == "up-long"]
    assert (row.requests, row.input_tokens, row.output_tokens) == (1, PROMPT, output_tokens)
    # up-* costs 1 in, 2 out; the refused request is not charged.
    assert usage.tokens_this_month == PROMPT + 2 * output_tokens


def test_a_stream_longer_than_its_lease_keeps_its_concurrency_slot(
    gateway, short_leases, single_call_user
):
    stream = gateway.client(single_call_user).chat.completions.create(
        model="up-long", messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    started, chunks, refusal = time.monotonic(), [], None
    for chunk in stream:
        chunks.append(chunk)
        if refusal is None and time.monotonic() - started > 2 * TTL:
            # Two leases' time into the stream: without renewal its reservation has
            # expired, and the second call would be admitted beside it.
            refusal = refused_beside(gateway, single_call_user)
    assert refusal is not None, "the stream ended before its lease would have expired"
    assert time.monotonic() - started >= LONG * 0.9
    assert "max_concurrent_requests" in refusal.message
    assert chunks[-1].usage.completion_tokens == WORDS
    assert_settled_exactly(short_leases, single_call_user, WORDS)


def test_a_slow_answer_longer_than_its_lease_keeps_its_concurrency_slot(
    gateway, short_leases, single_call_user
):
    answers = []
    slow = threading.Thread(
        target=lambda: answers.append(
            gateway.client(single_call_user).chat.completions.create(
                model="up-long", messages=MSGS, max_tokens=30
            )
        )
    )
    slow.start()
    time.sleep(2 * TTL)
    refusal = refused_beside(gateway, single_call_user)
    slow.join(4 * LONG)
    assert "max_concurrent_requests" in refusal.message
    (answer,) = answers
    assert answer.usage.completion_tokens == 30
    assert_settled_exactly(short_leases, single_call_user, 30)
