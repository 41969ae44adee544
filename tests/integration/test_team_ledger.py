"""A team as a payer in the ledger: its limits apply to all its members together and
are reserved in the same step as each member's own (real Redis; the cluster's two-step
version runs these very tests in tests/system/test_cluster_teams.py)."""

from __future__ import annotations

from datetime import datetime, timedelta

from llm_quota.ledger.replies import MemberUsage, ModelUsage, TeamMonth
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support.factories import estimate


def _team(**limits) -> Limits:
    return Limits(tokens_per_month=100_000, team="9", **limits)


def test_members_share_the_team_budget_and_the_refusal_names_it(ledger):
    limits = _team(team_tokens_per_month=1000)
    first = [ledger.reserve(uid, limits, estimate(100, 150), clamp=False) for uid in (1, 2, 3, 4)]
    assert all(d.allowed for d in first)
    refused = ledger.reserve(5, limits, estimate(100, 150), clamp=False)
    assert not refused.allowed and refused.limit == "team.tokens_per_month" and refused.is_budget
    # The refused member holds nothing; the others hold their own share each.
    assert ledger.usage(5).tokens_this_month == 0
    assert ledger.usage(1).tokens_this_month == 250
    team = ledger.team_usage("9")
    assert (team.tokens_this_month, team.reserved, team.in_flight) == (1000, 1000, 4)


def test_a_members_own_limit_refuses_and_leaves_the_team_untouched(ledger):
    limits = Limits(tokens_per_day=300, team="9", team_tokens_per_day=10_000)
    assert ledger.reserve(1, limits, estimate(100, 100), clamp=False).allowed
    refused = ledger.reserve(1, limits, estimate(100, 100), clamp=False)
    assert not refused.allowed and refused.limit == "tokens_per_day"
    assert ledger.team_usage("9").tokens_today == 200
    assert ledger.reserve(2, limits, estimate(100, 100), clamp=False).allowed


def test_team_requests_per_minute_and_concurrency_count_every_member(ledger):
    limits = _team(team_requests_per_minute=3, team_max_concurrent_requests=2)
    a = ledger.reserve(1, limits, estimate(1, 1))
    b = ledger.reserve(2, limits, estimate(1, 1))
    busy = ledger.reserve(3, limits, estimate(1, 1))
    assert a.allowed and b.allowed
    assert not busy.allowed and busy.limit == "team.max_concurrent_requests"
    ledger.settle(a.reservation, ActualUsage(1, 1))
    assert ledger.reserve(3, limits, estimate(1, 1)).allowed  # the 3rd request this minute
    late = ledger.reserve(4, _team(team_requests_per_minute=3), estimate(1, 1))
    assert not late.allowed and late.limit == "team.requests_per_minute"


def test_settle_charges_the_team_by_member_and_model_and_release_gives_back(ledger):
    limits = _team(team_tokens_per_month=10_000)
    one = ledger.reserve(1, limits, estimate(100, 400)).reservation
    two = ledger.reserve(2, limits, estimate(100, 400)).reservation
    assert one.team == "9"
    ledger.settle(one, ActualUsage(100, 50))
    assert ledger.release(two) is True
    team = ledger.team_usage("9")
    assert (team.tokens_this_month, team.reserved, team.in_flight) == (150, 0, 0)
    assert [(m.user_id, m.requests, m.base_tokens) for m in team.by_member] == [("1", 1, 150)]
    assert [(m.model, m.base_tokens) for m in team.by_model] == [("gpt-4o", 150)]
    assert ledger.settle(one, ActualUsage(999, 999)).settled is False  # once only
    assert ledger.team_usage("9").tokens_this_month == 150


def test_an_abandoned_reservation_frees_the_team_share_too(ledger, clock):
    limits = _team(team_tokens_per_month=1000)
    assert ledger.reserve(1, limits, estimate(400, 400), clamp=False).allowed
    assert not ledger.reserve(2, limits, estimate(400, 400), clamp=False).allowed
    clock.advance(ledger.ops.ttl_ms / 1000 + 1)
    assert ledger.reserve(2, limits, estimate(400, 400), clamp=False).allowed


def test_key_team_and_user_are_reserved_together_and_the_tightest_clamps(ledger):
    limits = Limits(
        tokens_per_month=100_000, api_key="4", key_tokens_per_month=5000,
        team="9", team_tokens_per_day=300,
    )  # fmt: skip
    decision = ledger.reserve(1, limits, estimate(100, 1000))
    assert decision.allowed and decision.reservation.max_tokens == 200
    assert decision.tokens_limit == 300 and decision.tokens_remaining == 0
    ledger.settle(decision.reservation, ActualUsage(100, 100))
    assert ledger.team_usage("9").tokens_today == 200
    assert ledger.key_usage(1, "4").tokens_today == 200
    assert ledger.usage(1).tokens_today == 200


def test_a_settle_reports_the_teams_month_so_far(ledger):
    limits = _team(team_tokens_per_month=10_000)
    first = ledger.settle(ledger.reserve(1, limits, estimate(100, 100)).reservation,
                          ActualUsage(100, 50))  # fmt: skip
    second = ledger.settle(ledger.reserve(2, limits, estimate(100, 100)).reservation,
                           ActualUsage(10, 10))  # fmt: skip
    assert (first.team_month_used, second.team_month_used) == (150, 170)
    again = ledger.settle(
        ledger.reserve(3, Limits(), estimate(1, 1)).reservation, ActualUsage(1, 1)
    )
    assert again.team_month_used is None  # no team


def test_a_lost_teams_month_comes_back_once_before_the_next_decision(ledger):
    """A team with no counters in Redis (lost with its data, or its slot's primary) is
    restored from its source before anything is decided against it, once."""
    month = ledger.periods()[1]
    asked = []

    def from_snapshot(team, period):
        asked.append((team, period))
        if period != month:
            return None
        return TeamMonth(
            total=ModelUsage("", 3, 300, 600, 900),
            by_member=[MemberUsage("1", 3, 300, 600, 900)],
            by_model=[ModelUsage("gpt-4o", 3, 300, 600, 900)],
        )

    ledger.restore_teams_source = from_snapshot
    limits = _team(team_tokens_per_month=1000)
    refused = ledger.reserve(2, limits, estimate(200, 0), clamp=False)
    assert not refused.allowed and refused.limit == "team.tokens_per_month"
    assert ledger.reserve(2, limits, estimate(100, 0), clamp=False).allowed
    assert len(asked) == 2  # this month and the one before, once
    team = ledger.team_usage("9")
    assert (team.tokens_this_month, team.reserved) == (1000, 100)
    assert [(m.user_id, m.base_tokens) for m in team.by_member] == [("1", 900)]
    assert ledger.usage(1).tokens_this_month == 0  # the member's own month is their own


def test_a_lost_teams_day_comes_back_with_its_month_once(ledger):
    """Redis lost the team's counters (issue 17): its day as the snapshot holds it is
    added back once, before the next decision charged to the team (on a cluster, in the
    team's own slot), so the team's day budget is not handed out a second time."""
    today, month = ledger.periods()
    asked = []

    def from_snapshot(team, period):
        asked.append(period)
        if period != month:
            return None
        total = ModelUsage("", 3, 300, 600, 900)
        return TeamMonth(total=total, day=today, day_base_tokens=800)

    ledger.restore_teams_source = from_snapshot
    limits = _team(team_tokens_per_day=1000)
    refused = ledger.reserve(2, limits, estimate(150, 100), clamp=False)  # 250 > 200 left
    assert not refused.allowed and refused.limit == "team.tokens_per_day"
    assert ledger.reserve(2, limits, estimate(100, 100), clamp=False).allowed  # 200 fits
    assert len(asked) == 2  # this month and the one before, once
    team = ledger.team_usage("9")
    assert (team.tokens_today, team.tokens_this_month) == (1000, 1100)


def test_a_teams_day_that_is_over_is_not_restored(ledger):
    """The snapshot's day was yesterday: the month comes back, the day starts afresh."""
    today, month = ledger.periods()
    yesterday = (datetime.strptime(today, "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d")
    ledger.restore_teams_source = lambda team, period: (
        TeamMonth(ModelUsage("", 3, 300, 600, 900), day=yesterday, day_base_tokens=800)
        if period == month
        else None
    )
    limits = _team(team_tokens_per_day=1000)
    assert ledger.reserve(2, limits, estimate(500, 500), clamp=False).allowed  # all of today
    team = ledger.team_usage("9")
    assert (team.tokens_today, team.tokens_this_month) == (1000, 1900)


def test_a_teams_leases_and_records_expire_even_if_nobody_comes_back(ledger):
    """A team's lease set and records get an expiry whenever the set is new: the reserve
    knows it is new from the team's calls in flight where it counts them (a concurrency
    limit), and asks Redis where it does not."""
    for team, extra in (("8", {"team_max_concurrent_requests": 5}), ("9", {})):
        limits = Limits(tokens_per_month=100_000, team=team, team_tokens_per_day=10**6, **extra)
        base = ledger.keyspace.team(team)
        for _ in range(2):  # a new set, and a set emptied by the settle before
            first = ledger.reserve(1, limits, estimate(10, 10)).reservation
            second = ledger.reserve(2, limits, estimate(10, 10)).reservation  # not new
            assert ledger.client.pttl(base + ":p") > 0
            assert ledger.client.pttl(base + ":rr") > 0
            ledger.settle(first, ActualUsage(10, 10))
            ledger.settle(second, ActualUsage(10, 10))
            assert ledger.client.exists(base + ":p") == 0


def test_a_teams_tombstones_expire_even_if_nobody_comes_back(ledger, clock):
    """Whoever writes a tombstone into a team's T:z gives it its expiry: a release (here
    of a second call, so no reserve found the lease set new after it) and an expired
    lease's give-back."""
    limits = _team(team_tokens_per_day=10**6)
    base = ledger.keyspace.team("9")
    first = ledger.reserve(1, limits, estimate(10, 10)).reservation
    second = ledger.reserve(2, limits, estimate(10, 10)).reservation
    assert ledger.client.exists(base + ":z") == 0
    assert ledger.release(second) is True
    assert ledger.client.pttl(base + ":z") > 0
    ledger.client.delete(base + ":z")
    clock.advance(ledger.ops.ttl_ms / 1000 + 1)  # the first call's lease runs out
    assert ledger.reserve(3, limits, estimate(10, 10)).allowed
    assert ledger.client.zscore(base + ":z", first.id) is not None
    assert ledger.client.pttl(base + ":z") > 0
