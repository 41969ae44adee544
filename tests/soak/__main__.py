"""``python -m tests.soak [--seconds 600]``: a chaos soak, bounded in time.

gunicorn serves the demo project on a private Redis under Sentinel (a durable primary
and replica, three Sentinels, ``tests/support/sentinel_group``; ports from
``LLMQ_TEST_PORTS``) with the durable journal (``JOURNAL_DIR``), in front of the oracle
upstream (which bills every call as OpenAI would, ``tests/support/oracle_upstream``).
Client threads send chat completions for users with a JWT, some of them with an API
key too, half of them members of one team (a third streamed; some streams dropped by
the client after the first chunk) while a driver, at random every few seconds,
SIGKILLs the current primary (back a second later), freezes it (SIGSTOP for 2 s),
fails over Sentinel (``SENTINEL FAILOVER``) or SIGKILLs a gunicorn worker (the master
starts another). The snapshot task runs every 5 s meanwhile, as it would in
production. At the end every invariant is checked for every user, API key and team
(``tests/soak/invariants``) and a table printed (docs/pages/reliability.md keeps the
last run's).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import psutil

from tests.soak.plan import (
    DOWN_AFTER_MS,
    FAULTS,
    KEY_TOKENS_PER_DAY,
    MAX_TOKENS,
    MODEL,
    SERVICE,
    SNAPSHOT_EVERY,
    TEAM_TOKENS_PER_DAY,
    THREADS,
    TIER,
    WORKERS,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Credential:
    """How a call authenticates: a user's JWT, or one of their API keys (``key``); a
    team member names the team (``OpenAI-Organization``), which pays either way."""

    user: int
    bearer: str
    key: int | None = None
    team: int | None = None
    team_slug: str | None = None


class Load:
    """Client threads: what each call got. Each body's ``user`` says who pays
    ("user:key"), so the oracle's bills can be summed per user, key and team."""

    def __init__(self, base: str, credentials: list[Credential], concurrency: int) -> None:
        self.base, self.credentials, self.concurrency = base, credentials, concurrency
        self.statuses: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        who = rng.choice(self.credentials)
        stream = rng.random() < 0.33
        drop = stream and rng.random() < 0.15
        body = {
            "model": MODEL, "max_tokens": rng.choice(MAX_TOKENS),
            "user": f"{who.user}:{who.key or ''}",
            "messages": [{"role": "user", "content": "soak " * rng.randint(1, 40)}],
            "stream": stream,
        }  # fmt: skip
        headers = {"Authorization": f"Bearer {who.bearer}"}
        if who.team_slug:
            headers["OpenAI-Organization"] = who.team_slug
        try:
            url = f"{self.base}/v1/chat/completions"
            with client.stream("POST", url, json=body, headers=headers) as response:
                status = str(response.status_code)
                if status == "429":
                    response.read()
                    status += " " + str(response.json().get("error", {}).get("code"))
                for n, _line in enumerate(response.iter_lines()):
                    if drop and n >= 1:
                        status = "dropped by the client"
                        break
        except httpx.HTTPError:
            status = "connection error"
        with self.lock:
            self.statuses[status] += 1

    def run(self) -> list[threading.Thread]:
        def loop(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=30) as client:
                while not self.stop.is_set():
                    self.one(client, rng)

        threads = [threading.Thread(target=loop, args=(n,), daemon=True)
                   for n in range(self.concurrency)]  # fmt: skip
        for thread in threads:
            thread.start()
        return threads


class Chaos(threading.Thread):
    """Every 3 to 8 s one fault, each once per round in a random order (so a minute
    sees every one), on whichever server is primary then; counts what it did, and
    when each failover began and ended."""

    def __init__(self, group, gunicorn: subprocess.Popen, seed: int = 17) -> None:
        super().__init__(daemon=True)
        self.group, self.gunicorn = group, gunicorn
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.faults: Counter[str] = Counter()
        self.failovers: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            order: list[str] = []
            while not self.done.wait(self.rng.uniform(3, 8)):
                if not order:  # each fault once per round, in a random order
                    order = self.rng.sample(FAULTS, len(FAULTS))
                fault = order.pop()
                self.inject(fault)
                self.faults[fault] += 1
        except BaseException as error:  # reported by the check, never hidden
            self.error = error

    def inject(self, fault: str) -> None:
        if fault == "redis SIGKILL":
            primary = self.group.primary()
            primary.kill()
            time.sleep(1)
            primary.replica_of = None  # back as the primary it was (its data on disk)
            primary.start()
        elif fault == "redis SIGSTOP 2 s":
            primary = self.group.primary()
            primary.freeze()
            time.sleep(2)
            primary.thaw()
        elif fault == "Sentinel failover":
            began = time.time()
            self.group.fail_over()
            self.failovers.append((began, time.time()))
        else:
            children = psutil.Process(self.gunicorn.pid).children()
            if children:
                self.rng.choice(children).send_signal(signal.SIGKILL)


class Snapshots(threading.Thread):
    """The snapshot task every ``SNAPSHOT_EVERY`` s, as Celery beat would run it: the
    run after a failover raises what the promoted replica lost. Counts the runs that
    finished, those that failed (by cause) and what they raised."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.finished = 0
        self.raised_tokens = 0
        self.failed: Counter[str] = Counter()  # why, by exception

    def run(self) -> None:
        from django.db import connection

        from llm_quota.reporting.snapshot import snapshot_usage

        while not self.done.wait(SNAPSHOT_EVERY):
            self.once(snapshot_usage)
        connection.close()

    def once(self, snapshot_usage) -> None:
        try:
            run = snapshot_usage(lock_wait=5)
        except Exception as error:  # Redis away or frozen: the next run does it
            self.failed[type(error).__name__] += 1
            return
        self.finished += 1
        self.raised_tokens += run.raised_tokens


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: every ``finally`` below stops what it started."""

    def leave(_signum, _frame):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, leave)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=12)
    args = parser.parse_args(argv)
    _stop_on_sigterm()

    from tests.support.oracle_upstream import OracleServer
    from tests.support.sentinel_group import SentinelGroup

    scratch = Path(tempfile.mkdtemp(prefix="llmq-soak-"))
    group = oracle = None
    try:
        group = SentinelGroup(scratch / "redis", SERVICE, down_after_ms=DOWN_AFTER_MS,
                              durable=True)  # fmt: skip
        group.start()
        oracle = OracleServer().start()
        return _soak(args, group, oracle, scratch)
    finally:
        if oracle is not None:
            oracle.stop()
        if group is not None:
            group.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _soak(args, group, oracle, scratch: Path) -> int:
    from tests.loadtest.harness import wait_for_port
    from tests.soak import invariants
    from tests.support.redis_server import free_port

    os.environ.pop("REDIS_URL", None)
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in group.sentinel_ports),
        "REDIS_SENTINEL_SERVICE": SERVICE,
        "DATABASE_URL": f"sqlite:///{scratch / 'soak.sqlite3'}",
        "OPENAI_BASE_URL": oracle.url,
        "OPENAI_API_KEY": "soak",
        "LLM_QUOTA_KEY_PREFIX": f"soak{uuid.uuid4().hex[:8]}",
        "LLMQ_JOURNAL_DIR": str(scratch / "journal"),
        "DJANGO_DEBUG": "0",
    })  # fmt: skip
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    credentials = _seed(args.users)
    port = free_port()
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "project.wsgi", "-w", str(WORKERS),
         "-k", "gthread", "--threads", str(THREADS), "-b", f"127.0.0.1:{port}",
         "--log-level", "critical", "--graceful-timeout", "5"],
        cwd=ROOT, env={**os.environ}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    load = Load(f"http://127.0.0.1:{port}", credentials, args.concurrency)
    chaos = Chaos(group, gunicorn)
    snapshots = Snapshots()
    try:
        wait_for_port(port)
        print(f"soak: {args.seconds:.0f} s, gunicorn {WORKERS}x{THREADS} at {load.base}, "
              f"Redis {[s.port for s in group.servers]} under Sentinels {group.sentinel_ports}, "
              f"{args.users} users, {sum(c.key is not None for c in credentials)} API keys, "
              f"one team")  # fmt: skip
        threads = load.run()
        chaos.start()
        snapshots.start()
        time.sleep(args.seconds)
        chaos.done.set()
        chaos.join(60)
        load.stop.set()
        for thread in threads:
            thread.join(30)
        # Let every worker see Redis answer: its journal is charged before its next call.
        time.sleep(2.5)
        drain = Load(load.base, credentials, 4)
        with httpx.Client(timeout=30) as client:
            for _ in range(WORKERS * THREADS * 2):
                drain.one(client, random.Random())
        load.statuses.update(drain.statuses)
    finally:
        snapshots.done.set()
        gunicorn.send_signal(signal.SIGTERM)
        try:
            gunicorn.wait(timeout=20)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            gunicorn.wait(10)
    snapshots.join(30)
    return 0 if invariants.check(credentials, oracle, load, chaos, snapshots, scratch) else 1


def _seed(users: int) -> list[Credential]:
    """``users`` users on one tier, each with a JWT; the first half members of one team,
    the middle half (two of them members) each with an API key too."""
    from django.contrib.auth import get_user_model

    from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
    from llm_quota.models import ModelPrice, Team, TeamMembership, Tier, UserQuota
    from tests.support.api_keys import api_key

    # The burn-rate breaker off: every soak user passes its floor (100,000 base tokens a
    # minute) in the first minute, and a 15-minute pause would leave the soak refusing.
    level = Tier.objects.create(name="soak", allowed_models="", burn_multiplier=None, **TIER)
    team_level = Tier.objects.create(
        name="soak team", allowed_models="", burn_multiplier=None,
        **{**TIER, "tokens_per_day": TEAM_TOKENS_PER_DAY},
    )  # fmt: skip
    team = Team.objects.create(slug="soak-team", name="Soak team", tier=team_level)
    ModelPrice.objects.update_or_create(
        model=MODEL,
        defaults=dict(input_multiplier=Decimal("1"), output_multiplier=Decimal("4"),
                      default_max_output_tokens=64),
    )  # fmt: skip
    credentials = []
    for n in range(users):
        user = get_user_model().objects.create_user(f"soak-{n}")
        UserQuota.objects.create(user=user, tier=level)
        member = n < users // 2
        if member:
            TeamMembership.objects.create(team=team, user=user)
        paid = dict(team=team.pk, team_slug=team.slug) if member else {}
        token = ScopedTokenObtainPairSerializer.get_token(user).access_token
        credentials.append(Credential(user.pk, str(token), **paid))
        if users // 4 <= n < users * 3 // 4:
            key, plaintext = api_key(user, tokens_per_day=KEY_TOKENS_PER_DAY)
            credentials.append(Credential(user.pk, plaintext, key=key.pk, **paid))
    return credentials


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
