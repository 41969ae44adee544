"""The soak's invariants, checked for every user, API key and team, and its tables.

Each payer's bound is computed from what happened in the run:

- lost (billed by the oracle, never charged) at most what killed workers had in
  flight (their threads times the largest call, per kill) plus what the oracle billed
  the payer during each Sentinel failover (from ``MARGIN`` s before it began to
  ``MARGIN`` s after it ended): writes the promoted replica had not received, or that
  reached the old primary before it was demoted, are gone, and the snapshot run only
  brings back what settled before it ran;
- spent (billed) past a day budget at most fail-open's shares (each process admits a
  payer, per minute while Redis is away, its share of the day, or one call), for
  every Redis fault, plus what the payer may have lost (its counters were low by it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from tests.soak.plan import (
    KEY_TOKENS_PER_DAY,
    MAX_TOKENS,
    MODEL,
    TEAM_TOKENS_PER_DAY,
    THREADS,
    TIER,
    WORKERS,
)  # fmt: skip

#: Seconds either side of a failover whose bills count in its bound: a call's settle
#: follows its bill by milliseconds, more on a loaded machine.
MARGIN = 1.0


def _payers(user: int, key: int | None, team: int | None) -> list[tuple[str, int]]:
    found = [("user", user)]
    if key is not None:
        found.append(("key", key))
    if team is not None:
        found.append(("team", team))
    return found


def check(credentials, oracle, load, chaos, snapshots, scratch: Path) -> bool:
    """Charge what the workers left in their journal files, run the snapshot once more
    (as the next scheduled run would), then check every invariant; prints the tables."""
    from llm_quota.conf import quota_settings
    from llm_quota.ledger import resilience
    from llm_quota.ledger.default import get_ledger
    from llm_quota.ledger.fallback import token_share
    from llm_quota.ledger.sync_driver import Ledger
    from llm_quota.quota.drivers import run
    from llm_quota.reporting.snapshot import snapshot_usage
    from llm_quota.rules.accounting import Limits
    from llm_quota.rules.pricing import price_for

    def nothing(_ledger):
        return None
        yield

    run(resilience.resilient(nothing, lambda _e: None))  # adopts and charges the files
    snapshots.once(snapshot_usage)
    price, ledger = price_for(MODEL), get_ledger()
    teams = {c.user: c.team for c in credentials}
    billed: dict[tuple[str, int], int] = defaultdict(int)
    in_failover: dict[tuple[str, int], int] = defaultdict(int)
    windows = [(began - MARGIN, ended + MARGIN) for began, ended in chaos.failovers]
    for (body, usage), at in zip(list(oracle.bills), list(oracle.billed_at), strict=True):
        user, _, key = body["user"].partition(":")
        tokens = price.base_tokens(usage["prompt_tokens"], usage["completion_tokens"])
        during = any(low <= at <= high for low, high in windows)
        for payer in _payers(int(user), int(key) if key else None, teams[int(user)]):
            billed[payer] += tokens
            if during:
                in_failover[payer] += tokens

    # Past every reservation's TTL (a Ledger whose clock is ahead): what is still held
    # then would be held forever.
    later = Ledger(ledger.client, prefix=ledger.keyspace.prefix,
                   clock=lambda: time.time() + 601)  # fmt: skip

    def read(kind: str, pk: int, owner: int, on: Ledger) -> tuple[int, int]:
        """(settled this month, reserved) of one payer."""
        if kind == "user":
            usage = on.usage(pk)
            return usage.settled_this_month, usage.reserved
        if kind == "key":
            key = on.key_usage(owner, pk)
            return key.base_tokens, key.reserved
        team = on.team_usage(pk)
        return sum(row.base_tokens for row in team.by_model), team.reserved

    # Fail-open's documented bound: the share grows as the day ends, so the largest
    # over the run (sampled every 30 s back to 11 minutes ago).
    divisor, zone = int(quota_settings.FAIL_OPEN_DIVISOR), str(quota_settings.PERIOD_TIMEZONE)
    end = time.time()
    budgets = {"user": TIER["tokens_per_day"], "key": KEY_TOKENS_PER_DAY,
               "team": TEAM_TOKENS_PER_DAY}  # fmt: skip
    limits = {"user": Limits(tokens_per_minute=TIER["tokens_per_minute"],
                             tokens_per_day=TIER["tokens_per_day"]),
              "key": Limits(tokens_per_day=KEY_TOKENS_PER_DAY),
              "team": Limits(tokens_per_day=TEAM_TOKENS_PER_DAY)}  # fmt: skip
    most = price.base_tokens(200, max(MAX_TOKENS))  # a call's largest bill, about
    redis_faults = sum(chaos.faults[f] for f in ("redis SIGKILL", "redis SIGSTOP 2 s",
                                                 "Sentinel failover"))  # fmt: skip
    in_flight = chaos.faults["gunicorn worker SIGKILL"] * THREADS * most

    owners = {c.key: c.user for c in credentials if c.key is not None}
    payers = sorted({p for c in credentials for p in _payers(c.user, c.key, c.team)})
    rows: dict[str, list[int]] = {}  # kind: payers, billed, charged, lost, ...
    bad: dict[str, list[str]] = {"lost": [], "held": [], "over": []}
    for kind, pk in payers:
        owner = owners.get(pk, 0) if kind == "key" else pk
        charged, _ = read(kind, pk, owner, ledger)
        _, held = read(kind, pk, owner, later)
        lost, lost_bound = billed[kind, pk] - charged, in_flight + in_failover[kind, pk]
        share = max(token_share(limits[kind], divisor, end - 30 * n, zone) or 0
                    for n in range(23))  # fmt: skip
        over = billed[kind, pk] - budgets[kind]  # what was spent: the upstream's bill
        over_bound = redis_faults * WORKERS * max(share, most) + lost_bound
        who = f"{kind} {pk}"
        if not 0 <= lost <= lost_bound:
            bad["lost"].append(f"{who}: lost {lost} (bound {lost_bound})")
        if held:
            bad["held"].append(f"{who}: held {held}")
        if over > over_bound:
            bad["over"].append(f"{who}: over {over} (bound {over_bound})")
        row = rows.setdefault(kind, [0, 0, 0, 0, 0, 0, -(10**12), 0])
        row[0] += 1
        row[1] += billed[kind, pk]
        row[2] += charged
        row[3] = max(row[3], lost)
        row[4] = max(row[4], lost_bound)
        row[5] += held
        row[6] = max(row[6], over)
        row[7] = max(row[7], over_bound)

    five = sum(n for status, n in load.statuses.items() if status.isdigit() and int(status) >= 500)
    left = list((scratch / "journal").glob("*.journal"))
    checks = {
        f"every fault injected as asked ({chaos.error!r})" if chaos.error else
        "every fault injected as asked": chaos.error is None,
        "charged == billed for every user, key and team, within its bound "
        "(killed workers' calls in flight, bills during a failover)": not bad["lost"],
        "nothing reserved after the TTL (every payer)": not bad["held"],
        "no day budget passed beyond fail-open's shares (every payer)": not bad["over"],
        f"no 5xx ({five})": five == 0,
        f"no journal file left with entries ({len(left)})":
            all(p.stat().st_size == 0 for p in left),
    }  # fmt: skip
    print("\n| fault | injected |\n|---|---|")
    for fault, n in sorted(chaos.faults.items()):
        print(f"| {fault} | {n} |")
    began = chaos.failovers[0][0] if chaos.failovers else 0
    spans = ", ".join(f"{b - began:.0f} s in for {e - b:.1f} s" for b, e in chaos.failovers)
    during = sum(tokens for (kind, _), tokens in in_failover.items() if kind == "user")
    runs, raised = snapshots.finished, snapshots.raised_tokens
    print(f"\nfailovers: {spans or 'none'}; billed during them {during}; snapshot runs "
          f"{runs} (failed: {dict(snapshots.failed) or 0}), raised {raised}")  # fmt: skip
    print("\n| outcome | requests |\n|---|---|")
    for status, n in sorted(load.statuses.items()):
        print(f"| {status} | {n} |")
    print(
        "\n| payer | count | billed | charged | most lost (bound) | held | "
        "most over the day (bound) |\n|---|---|---|---|---|---|---|"
    )
    for kind in ("user", "key", "team"):
        n, b, c, lost, lost_bound, held, over, over_bound = rows[kind]
        print(
            f"| {kind} | {n} | {b} | {c} | {lost} ({lost_bound}) | {held} | "
            f"{max(over, 0)} ({over_bound}) |"
        )
    for line in bad["lost"] + bad["held"] + bad["over"]:
        print("  FAILED", line)
    print("\n| invariant | holds |\n|---|---|")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else 'NO'} |")
    return all(checks.values())
