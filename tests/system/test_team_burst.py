"""8 members of one team x 8 parallel requests each, in 4 processes, on one Redis and on
the 3-primary cluster: the team's settled total never exceeds its budget, no member
exceeds their own, and nothing is left reserved."""

from __future__ import annotations

import multiprocessing

import pytest
from django.conf import settings

from llm_quota.ledger.sync_driver import Ledger
from tests.system.concurrency_worker import team_burst

pytestmark = pytest.mark.slow

PROCESSES, MEMBERS, PER_MEMBER = 4, 8, 8
USER_CAP, TEAM_CAP, PROMPT, OUTPUT = 1_500, 6_000, 40, 200


def run_team_burst(url, prefix):
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    members = list(range(101, 101 + MEMBERS))
    share = MEMBERS // PROCESSES
    procs = [
        ctx.Process(
            target=team_burst,
            args=(
                url,
                prefix,
                members[n * share : (n + 1) * share],
                PER_MEMBER,
                USER_CAP,
                TEAM_CAP,
                PROMPT,
                OUTPUT,
                start,
                results,
            ),
        )  # fmt: skip
        for n in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    start.set()
    charged: dict[int, int] = {}
    refused: dict[str, int] = {}
    for _ in procs:
        theirs, their_refusals = results.get(timeout=120)
        charged.update(theirs)
        for limit, n in their_refusals.items():
            refused[limit] = refused.get(limit, 0) + n
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return charged, refused


def check(ledger, charged, refused):
    team = ledger.team_usage("77")
    assert team.reserved == 0 and team.in_flight == 0
    assert team.tokens_this_month == sum(charged.values()) <= TEAM_CAP
    # Each member's part of the team's figures is what they were charged, within budget.
    by_member = {int(m.user_id): m.base_tokens for m in team.by_member}
    for uid, spent in charged.items():
        usage = ledger.usage(uid)
        assert usage.reserved == 0 and usage.tokens_this_month == spent <= USER_CAP
        assert by_member.get(uid, 0) == spent
    # 64 requests of 40 to 240 tokens (140 on average, 8,960 in all) against 6,000: the
    # team's budget refused some, whatever the order they ran in. (How much was settled
    # depends on that order: reservations held at once refuse others, then settle lower.)
    assert refused.get("team.tokens_per_month", 0) > 0


def test_a_team_burst_never_overspends_on_one_redis(redis_client, quota_prefix):
    charged, refused = run_team_burst(settings.REDIS_URL, quota_prefix)
    check(Ledger(redis_client, prefix=quota_prefix), charged, refused)


def test_a_team_burst_never_overspends_on_the_cluster(redis_cluster, cluster_client, quota_prefix):
    charged, refused = run_team_burst(redis_cluster.url, quota_prefix)
    check(Ledger(cluster_client, prefix=quota_prefix), charged, refused)
