"""``python -m tests.soak [--seconds 600]``: a chaos soak, bounded in time.

gunicorn serves the demo project on a private, durable ``redis-server`` (ports
27100-27199) with the durable journal (``JOURNAL_DIR``), in front of the oracle
upstream (which bills every call as OpenAI would, ``tests/support/oracle_upstream``).
Client threads send chat completions (a third streamed; some streams dropped by the
client after the first chunk) while a driver, at random every few seconds, SIGKILLs
Redis (back a second later), freezes it (SIGSTOP for 2 s) or SIGKILLs a gunicorn
worker (the master starts another). At the end every invariant is checked and a table
printed (docs/pages/reliability.md keeps the last run's):

- charged == billed for every user, less at most what killed workers had in flight
  (a call the upstream billed whose worker died before it settled: its reservation
  expires instead, the documented bound);
- nothing reserved once the reservations' TTL has passed;
- no 5xx (``FAIL_OPEN`` admits blind; a killed worker's calls fail as connection
  errors, counted apart);
- no day budget passed by more than fail-open's shares allow (each process admits a
  user, per minute while Redis is away, 1/FAIL_OPEN_DIVISOR of the least of the minute
  limit and the day's limit over the minutes left in the day, or one call).
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
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o"
WORKERS, THREADS = 3, 8
TIER = dict(requests_per_minute=6000, tokens_per_minute=200_000, tokens_per_day=400_000)
MAX_TOKENS = (16, 32, 64)
FAULTS = ("redis SIGKILL", "redis SIGSTOP 2 s", "gunicorn worker SIGKILL")


class Load:
    """Client threads: what each call got, and what the oracle billed per user."""

    def __init__(self, base: str, accounts: list[tuple[int, str]], concurrency: int) -> None:
        self.base, self.accounts, self.concurrency = base, accounts, concurrency
        self.statuses: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        pk, token = rng.choice(self.accounts)
        stream = rng.random() < 0.33
        drop = stream and rng.random() < 0.15
        body = {
            "model": MODEL, "max_tokens": rng.choice(MAX_TOKENS), "user": str(pk),
            "messages": [{"role": "user", "content": "soak " * rng.randint(1, 40)}],
            "stream": stream,
        }  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"}
        try:
            url = f"{self.base}/v1/chat/completions"
            with client.stream("POST", url, json=body, headers=headers) as response:
                status = str(response.status_code)
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
    """Every 3 to 8 s one fault, at random; counts what it did."""

    def __init__(self, redis_server, gunicorn: subprocess.Popen, seed: int = 17) -> None:
        super().__init__(daemon=True)
        self.redis, self.gunicorn = redis_server, gunicorn
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.faults: Counter[str] = Counter()

    def run(self) -> None:
        while not self.done.wait(self.rng.uniform(3, 8)):
            fault = self.rng.choice(FAULTS)
            if fault == "redis SIGKILL":
                self.redis.kill()
                time.sleep(1)
                self.redis.start()
            elif fault == "redis SIGSTOP 2 s":
                self.redis.freeze()
                time.sleep(2)
                self.redis.thaw()
            else:
                children = psutil.Process(self.gunicorn.pid).children()
                if not children:
                    continue
                self.rng.choice(children).send_signal(signal.SIGKILL)
            self.faults[fault] += 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=12)
    args = parser.parse_args(argv)

    from tests.loadtest.harness import wait_for_port
    from tests.support.oracle_upstream import OracleServer
    from tests.support.redis_server import RedisServer, free_port

    scratch = Path(tempfile.mkdtemp(prefix="llmq-soak-"))
    redis_server = RedisServer(scratch / "redis", port=free_port(), durable=True).start()
    oracle = OracleServer().start()
    env = {
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": f"sqlite:///{scratch / 'soak.sqlite3'}",
        "OPENAI_BASE_URL": oracle.url,
        "OPENAI_API_KEY": "soak",
        "LLM_QUOTA_KEY_PREFIX": f"soak{uuid.uuid4().hex[:8]}",
        "LLMQ_JOURNAL_DIR": str(scratch / "journal"),
        "DJANGO_DEBUG": "0",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    accounts = _seed(args.users)
    port = free_port()
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "project.wsgi", "-w", str(WORKERS),
         "-k", "gthread", "--threads", str(THREADS), "-b", f"127.0.0.1:{port}",
         "--log-level", "critical", "--graceful-timeout", "5"],
        cwd=ROOT, env={**os.environ}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    load = chaos = None
    try:
        wait_for_port(port)
        base = f"http://127.0.0.1:{port}"
        load = Load(base, accounts, args.concurrency)
        chaos = Chaos(redis_server, gunicorn)
        print(f"soak: {args.seconds:.0f} s, gunicorn {WORKERS}x{THREADS} at {base}, "
              f"redis on {redis_server.port}, {args.users} users")  # fmt: skip
        threads = load.run()
        chaos.start()
        time.sleep(args.seconds)
        chaos.done.set()
        chaos.join()
        load.stop.set()
        for thread in threads:
            thread.join(30)
        # Let every worker see Redis answer: its journal is charged before its next call.
        time.sleep(2.5)
        drain = Load(base, accounts, 4)
        for _ in range(WORKERS * THREADS * 2):
            drain.one(httpx.Client(timeout=30), random.Random())
        load.statuses.update(drain.statuses)
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        try:
            gunicorn.wait(timeout=20)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
    try:
        report = _check(accounts, oracle, load, chaos, scratch)
    finally:
        oracle.stop()
        redis_server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if report else 1


def _seed(users: int) -> list[tuple[int, str]]:
    from django.contrib.auth import get_user_model

    from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
    from llm_quota.models import ModelPrice, Tier, UserQuota

    level = Tier.objects.create(name="soak", allowed_models="", **TIER)
    ModelPrice.objects.update_or_create(
        model=MODEL,
        defaults=dict(input_multiplier=Decimal("1"), output_multiplier=Decimal("4"),
                      default_max_output_tokens=64),
    )  # fmt: skip
    accounts = []
    for n in range(users):
        user = get_user_model().objects.create_user(f"soak-{n}")
        UserQuota.objects.create(user=user, tier=level)
        token = ScopedTokenObtainPairSerializer.get_token(user).access_token
        accounts.append((user.pk, str(token)))
    return accounts


def _check(accounts, oracle, load, chaos, scratch: Path) -> bool:
    """Charge what the workers left in their journal files, then every invariant."""
    from llm_quota.ledger import resilience
    from llm_quota.ledger.default import get_ledger
    from llm_quota.ledger.sync_driver import Ledger
    from llm_quota.quota.drivers import run
    from llm_quota.rules.pricing import price_for

    price = price_for(MODEL)
    ledger = get_ledger()

    def nothing(_ledger):
        return None
        yield

    run(resilience.resilient(nothing, lambda _e: None))  # adopts and charges the files
    billed: dict[int, int] = defaultdict(int)
    for body, usage in list(oracle.bills):
        if usage:
            billed[int(body["user"])] += price.base_tokens(
                usage["prompt_tokens"], usage["completion_tokens"]
            )
    # Past every reservation's TTL (a Ledger whose clock is ahead): what is still held
    # then would be held forever.
    later = Ledger(ledger.client, prefix=ledger.keyspace.prefix,
                   clock=lambda: time.time() + 601)  # fmt: skip
    rows, lost, held, over = [], 0, 0, 0
    for pk, _ in accounts:
        usage = ledger.usage(pk)
        held += later.usage(pk).reserved
        lost += billed[pk] - usage.settled_this_month
        over = max(over, usage.settled_this_month - TIER["tokens_per_day"])
        rows.append((pk, billed[pk], usage.settled_this_month))
    # Fail-open's documented bound: while Redis is away each process admits a user, per
    # sliding minute, its share (llm_quota.ledger.fallback.token_share: the day spread
    # over the minutes left in it, capped by the minute limit), or one call when its
    # window is empty; each Redis fault is shorter than a minute. The share grows as the
    # day ends: the largest over the run (sampled every 30 s back to 11 minutes ago).
    from llm_quota.conf import quota_settings
    from llm_quota.ledger.fallback import token_share
    from llm_quota.rules.accounting import Limits

    limits = Limits(tokens_per_minute=TIER["tokens_per_minute"],
                    tokens_per_day=TIER["tokens_per_day"])  # fmt: skip
    divisor, zone = int(quota_settings.FAIL_OPEN_DIVISOR), str(quota_settings.PERIOD_TIMEZONE)
    end = time.time()
    share = max(token_share(limits, divisor, end - 30 * n, zone) or 0 for n in range(23))
    most = price.base_tokens(200, max(MAX_TOKENS))  # a call's largest bill, about
    redis_faults = chaos.faults["redis SIGKILL"] + chaos.faults["redis SIGSTOP 2 s"]
    over_bound = redis_faults * WORKERS * max(share, most)
    kills = chaos.faults["gunicorn worker SIGKILL"]
    bound = kills * THREADS * most
    five = sum(n for status, n in load.statuses.items() if status.isdigit() and int(status) >= 500)
    left = list((scratch / "journal").glob("*.journal"))
    checks = {
        f"charged == billed, less killed workers' calls in flight (lost {lost} <= {bound})":
            0 <= lost <= bound,
        f"nothing reserved after the TTL (held {held})": held == 0,
        f"no 5xx ({five})": five == 0,
        f"no day budget passed beyond fail-open's shares (most over: {over} <= {over_bound})":
            over <= over_bound,
        f"no journal file left with entries ({len(left)})":
            all(p.stat().st_size == 0 for p in left),
    }  # fmt: skip
    print("\n| fault | injected |\n|---|---|")
    for fault, n in sorted(chaos.faults.items()):
        print(f"| {fault} | {n} |")
    print("\n| outcome | requests |\n|---|---|")
    for status, n in sorted(load.statuses.items()):
        print(f"| {status} | {n} |")
    print(f"\nbilled {sum(b for _, b, _ in rows)}, charged {sum(c for _, _, c in rows)}")
    print("\n| invariant | holds |\n|---|---|")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else 'NO'} |")
    return all(checks.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
