"""Section 4: what the gate adds to a whole request, through gunicorn.

One gunicorn serves both paths from the same workers (``e2e_settings``): the real
gateway (``/v1/chat/completions``: scope, estimate, reserve, upstream, settle) and the
same work without the gate (``tests.benchmarks.ungated``). Both call the built-in fake
provider (no ``OPENAI_BASE_URL``), which counts tokens like a real reply would be
counted, so the gate's cost is set against a request that does real work but spends
no time waiting on a network: the gate's worst case. A second, shorter comparison puts
a network-like delay upstream (the tests' HTTP upstream, ``up-slow`` at
``SLOW_LATENCY`` s), as a real provider has; a third takes gunicorn, sockets and client
threads away (Django's test client, one request at a time): the gate's own cost.

On a shared or busy host the load drifts, so the two paths take turns in short rounds
and each round's gate-on p50 is set against the gate-off p50 measured next to it; the
table gives the median of those ratios, their range, and the pooled figures.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from decimal import Decimal

import httpx

from tests.benchmarks.measure import Table, verdict
from tests.loadtest.harness import ROOT, _cleanup, free_port, wait_for_port

MODEL, SLOW_MODEL, SLOW_LATENCY, SLOW_ROUNDS = "gpt-4o-mini", "up-slow", 0.05, 4
ROUNDS, PER_ROUND, CONCURRENCY, USERS = 8, 400, 16, 16
WORKERS, THREADS = 2, 8
GATED, UNGATED = "/v1/chat/completions", "/bench/ungated/chat/completions"
TIER = dict(
    requests_per_minute=10**6, tokens_per_minute=10**9, tokens_per_day=10**10,
    tokens_per_month=10**11, max_concurrent_requests=10**4,
)  # fmt: skip


def _seed() -> list[str]:
    """Users on a tier no request reaches, and one access token each."""
    from django.contrib.auth import get_user_model

    from llm_quota.models import ModelPrice, Tier, UserQuota
    from llm_quota.tokens import ScopedTokenObtainPairSerializer

    run = uuid.uuid4().hex[:6]
    level = Tier.objects.create(name=f"bench-e2e-{run}", allowed_models="", **TIER)
    for model in (MODEL, SLOW_MODEL):
        ModelPrice.objects.update_or_create(
            model=model,
            defaults=dict(input_multiplier=Decimal("1"), output_multiplier=Decimal("4"),
                          default_max_output_tokens=64),
        )  # fmt: skip
    tokens = []
    for n in range(USERS):
        user = get_user_model().objects.create_user(f"bench-e2e-{run}-{n}")
        UserQuota.objects.create(user=user, tier=level)
        tokens.append(str(ScopedTokenObtainPairSerializer.get_token(user).access_token))
    return tokens


@contextmanager
def gunicorn(upstream_url: str | None = None):
    """Yield (base_url, tokens) with gunicorn serving the gateway and the baseline, in
    front of the built-in fake provider, or of ``upstream_url``."""
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    tokens = _seed()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.benchmarks.e2e_settings",
           "LLM_QUOTA_KEY_PREFIX": prefix, "DJANGO_DEBUG": "0"}  # fmt: skip
    env.pop("OPENAI_BASE_URL", None)  # the built-in fake provider
    if upstream_url:
        env.update(OPENAI_BASE_URL=upstream_url, OPENAI_API_KEY="bench")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "project.wsgi", "-w", str(WORKERS),
         "-k", "gthread", "--threads", str(THREADS), "-b", f"127.0.0.1:{port}",
         "--log-level", "warning", "--graceful-timeout", "5"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}", tokens
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        _cleanup(prefix)


def _bodies(total: int, model: str = MODEL) -> list[dict]:
    """The same requests for both paths: short chats, capped at 64 output tokens."""
    rng = random.Random(6)
    return [
        {"model": model, "max_tokens": 64,
         "messages": [{"role": "user", "content": "bench " * rng.randint(5, 60)}]}
        for _ in range(total)
    ]  # fmt: skip


def fire(base: str, path: str, tokens: list[str], bodies: list[dict]) -> tuple[float, list[float]]:
    """Send every body from CONCURRENCY threads; (requests/s, sorted latencies)."""
    latencies: list[float] = []
    failures: list[int] = []
    work = iter(enumerate(bodies))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            for n, body in work:
                headers = {"Authorization": f"Bearer {tokens[n % len(tokens)]}"}
                start = time.perf_counter()
                response = client.post(path, json=body, headers=headers)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        failures.append(response.status_code)

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{path}: {len(failures)} requests failed, e.g. {failures[:5]}")
    return len(bodies) / wall, sorted(latencies)


def _p(latencies: list[float], q: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * q))]


def _compare(base: str, tokens: list[str], bodies: list[dict], rounds: int):
    """Gate on and off in alternating rounds: (req/s medians, pooled latencies, p50 ratios)."""
    rates: dict[str, list[float]] = {GATED: [], UNGATED: []}
    pooled: dict[str, list[float]] = {GATED: [], UNGATED: []}
    added: list[float] = []
    for path in (GATED, UNGATED):  # warm every worker: imports, encodings, scripts
        fire(base, path, tokens, bodies)
    for n in range(rounds):
        p50 = {}
        for path in (UNGATED, GATED) if n % 2 else (GATED, UNGATED):
            rate, lat = fire(base, path, tokens, bodies)
            rates[path].append(rate)
            pooled[path] += lat
            p50[path] = _p(lat, 0.5)
        added.append(p50[GATED] / p50[UNGATED] - 1)
        print(f"  round {n + 1}/{rounds}: gate on {rates[GATED][-1]:,.0f} req/s, p50 "
              f"{p50[GATED] * 1e3:.1f} ms; gate off {rates[UNGATED][-1]:,.0f} req/s, p50 "
              f"{p50[UNGATED] * 1e3:.1f} ms; p50 {added[-1]:+.1%}", flush=True)  # fmt: skip
    medians = {path: statistics.median(r) for path, r in rates.items()}
    return medians, {path: sorted(lat) for path, lat in pooled.items()}, added


def in_process(tokens: list[str], bodies: list[dict]) -> dict[str, float]:
    """Seconds per request on each path, one at a time through Django's test client: the
    CPU and round trips each costs, without gunicorn, sockets or client threads."""
    from django.test import Client, override_settings
    from django_redis import get_redis_connection

    from llm_quota.redis_ledger import Ledger, get_ledger, set_default_ledger

    client, previous = Client(), get_ledger()
    ledger = Ledger(get_redis_connection("default"), prefix=f"bench{uuid.uuid4().hex[:8]}",
                    restore=previous.restore_source)  # fmt: skip
    set_default_ledger(ledger)

    def one_pass(path: str) -> float:
        start = time.perf_counter()
        for n, body in enumerate(bodies):
            bearer = f"Bearer {tokens[n % len(tokens)]}"
            response = client.post(path, body, content_type="application/json",
                                   HTTP_AUTHORIZATION=bearer)  # fmt: skip
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.content[:200]!r}")
        return (time.perf_counter() - start) / len(bodies)

    try:
        with override_settings(ROOT_URLCONF="tests.benchmarks.ungated"):
            for path in (GATED, UNGATED):
                one_pass(path)
            samples: dict[str, list[float]] = {GATED: [], UNGATED: []}
            for _ in range(3):
                for path in (GATED, UNGATED):
                    samples[path].append(one_pass(path))
    finally:
        set_default_ledger(previous)
        _cleanup(ledger.keyspace.prefix)
    return {path: statistics.median(values) for path, values in samples.items()}


def run(table: Table) -> None:
    with gunicorn() as (base, tokens):
        rates, lat, added = _compare(base, tokens, _bodies(PER_ROUND), ROUNDS)
    on, off = lat[GATED], lat[UNGATED]
    where = (f"gunicorn {WORKERS}x{THREADS} threads, {ROUNDS}x{PER_ROUND} requests a side, "
             f"{CONCURRENCY} at once, fake provider")  # fmt: skip
    table.add("4 end-to-end", "gate off: requests/s (median of rounds)",
              f"{rates[UNGATED]:,.0f}/s", where)  # fmt: skip
    table.add("4 end-to-end", "gate on: requests/s (median of rounds)", f"{rates[GATED]:,.0f}/s",
              f"{rates[GATED] / rates[UNGATED]:.2f}x of gate off")  # fmt: skip
    table.add("4 end-to-end", "gate off: p50 / p99 latency (pooled)",
              f"{_p(off, 0.5) * 1e3:.1f} / {_p(off, 0.99) * 1e3:.1f} ms")  # fmt: skip
    table.add("4 end-to-end", "gate on: p50 / p99 latency (pooled)",
              f"{_p(on, 0.5) * 1e3:.1f} / {_p(on, 0.99) * 1e3:.1f} ms",
              f"p50 {_p(on, 0.5) / _p(off, 0.5):.2f}x, p99 {_p(on, 0.99) / _p(off, 0.99):.2f}x "
              "of gate off")  # fmt: skip
    middle = statistics.median(added)
    table.add("4 end-to-end", "latency the gate adds at p50 (median of rounds)",
              f"{middle:+.1%}", f"< 10%: {verdict(middle < 0.10)}; rounds "
              f"{min(added):+.0%}..{max(added):+.0%}")  # fmt: skip
    each = in_process(tokens, _bodies(PER_ROUND // 2))
    table.add("4 end-to-end", "in process, one at a time: gate off / on, per request",
              f"{each[UNGATED] * 1e3:.2f} / {each[GATED] * 1e3:.2f} ms",
              f"the gate's own cost {(each[GATED] - each[UNGATED]) * 1e3:.2f} ms "
              f"({each[GATED] / each[UNGATED] - 1:+.0%})")  # fmt: skip
    _with_network_delay(table)


def _with_network_delay(table: Table) -> None:
    import tests.fake_upstream as fake_upstream

    fake_upstream.LATENCY = SLOW_LATENCY
    upstream = fake_upstream.UpstreamServer().start()
    try:
        with gunicorn(upstream.url) as (base, tokens):
            rates, lat, added = _compare(
                base, tokens, _bodies(PER_ROUND, SLOW_MODEL), SLOW_ROUNDS
            )
    finally:
        upstream.stop()
    on, off = lat[GATED], lat[UNGATED]
    delay = f"upstream {SLOW_LATENCY * 1e3:.0f} ms"
    table.add("4 end-to-end", f"{delay}: gate off, req/s and p50 / p99",
              f"{rates[UNGATED]:,.0f}/s, {_p(off, 0.5) * 1e3:.1f} / "
              f"{_p(off, 0.99) * 1e3:.1f} ms", f"{SLOW_ROUNDS}x{PER_ROUND} a side")  # fmt: skip
    table.add("4 end-to-end", f"{delay}: gate on, req/s and p50 / p99",
              f"{rates[GATED]:,.0f}/s, {_p(on, 0.5) * 1e3:.1f} / "
              f"{_p(on, 0.99) * 1e3:.1f} ms")  # fmt: skip
    middle = statistics.median(added)
    table.add("4 end-to-end", f"{delay}: latency the gate adds at p50", f"{middle:+.1%}",
              f"< 10%: {verdict(middle < 0.10)}; rounds "
              f"{min(added):+.0%}..{max(added):+.0%}")  # fmt: skip
