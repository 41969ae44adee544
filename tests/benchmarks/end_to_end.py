"""Section 4: what the gate adds to a whole request, through gunicorn.

One gunicorn serves both paths from the same workers (``e2e_settings``): the real
gateway (``/v1/chat/completions``: scope, estimate, reserve, upstream, settle) and the
same work without the gate (``tests.benchmarks.ungated``: the same JWT authentication,
view class, body validation and upstream call). Both call the built-in fake provider
(no ``OPENAI_BASE_URL``), which counts tokens like a real reply would be counted and
never waits on a network (its own time per call is measured and printed with the
table), so the gate's cost is set against a request that does real work but spends
no time waiting: the gate's worst case. A second comparison puts a network-like delay
upstream (the tests' HTTP upstream, ``up-slow`` at ``SLOW_LATENCY`` s), as a real
provider has; a third takes gunicorn, sockets and client threads away (Django's test
client, one request at a time): the gate's own cost.

Two questions, measured apart, because on 2 cores the answers blur into each other:

- **Latency** (the < 10% goal): one request at a time, so the p50 is the request's own
  time and not a queue. Gate-on and gate-off requests alternate one by one (in ABBA
  order) from one client, so a load change on a shared host hits both paths alike;
  each round's p50s give a ratio, and the table shows the median ratio and the range.
- **Capacity**: ``SATURATION`` requests at once, enough to keep both workers busy;
  gate-on and gate-off rounds alternate. Here latency is mostly queueing (the client,
  both workers and Redis share the 2 cores), so the p50 ratio is the CPU-cost ratio,
  not what a caller of an unloaded server waits; requests/s is what this run is for.
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
from typing import NamedTuple

import httpx

from tests.benchmarks.measure import Table, verdict
from tests.loadtest.harness import ROOT, _cleanup, free_port, wait_for_port

MODEL, SLOW_MODEL, SLOW_LATENCY = "gpt-4o-mini", "up-slow", 0.05
USERS, WORKERS, THREADS = 16, 2, 8
#: One-at-a-time latency: rounds of gate-on/gate-off pairs.
ROUNDS, PAIRS = 10, 200
SLOW_ROUNDS, SLOW_PAIRS = 4, 40
#: Capacity: rounds per side, requests per round, and how many at once. Two per worker
#: keep both busy; more would only add client threads fighting them for the 2 cores.
SAT_ROUNDS, PER_ROUND, SATURATION = 6, 400, 4
#: Behind the slow upstream, requests mostly wait: many at once, as a server sees them.
SLOW_CONCURRENCY = 16
IN_PROCESS_PASSES = 5
GATED, UNGATED = "/v1/chat/completions", "/bench/ungated/chat/completions"
TIER = dict(
    requests_per_minute=10**6, tokens_per_minute=10**9, tokens_per_day=10**10,
    tokens_per_month=10**11, max_concurrent_requests=10**4,
)  # fmt: skip


def _seed() -> list[str]:
    """Users on a tier no request reaches, and one access token each."""
    from django.contrib.auth import get_user_model

    from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
    from llm_quota.models import ModelPrice, Tier, UserQuota

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


def _post(client: httpx.Client, path: str, token: str | None, body: dict) -> float:
    """Seconds for one call, to its last byte (a stream read to its end); raises unless
    it answered 200. No token: the upstream itself, called directly."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    start = time.perf_counter()
    if body.get("stream"):
        with client.stream("POST", path, json=body, headers=headers) as response:
            response.read()
    else:
        response = client.post(path, json=body, headers=headers)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{path}: HTTP {response.status_code} {response.text[:200]}")
    return elapsed


def fire(
    base: str, path: str, tokens: list[str], bodies: list[dict], concurrency: int
) -> tuple[float, list[float]]:
    """Send every body from ``concurrency`` threads; (requests/s, sorted latencies).
    No tokens: the upstream itself, called directly."""
    latencies: list[float] = []
    work = iter(enumerate(bodies))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            try:
                for n, body in work:
                    token = tokens[n % len(tokens)] if tokens else None
                    elapsed = _post(client, path, token, body)
                    with lock:
                        latencies.append(elapsed)
            except Exception as exc:  # re-raised below, from the main thread
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    return len(bodies) / wall, sorted(latencies)


def fire_pairs(base: str, tokens: list[str], bodies: list[dict]) -> dict[str, list[float]]:
    """One request at a time, each body sent to both paths in ABBA order; sorted
    latencies per path."""
    latencies: dict[str, list[float]] = {GATED: [], UNGATED: []}
    with httpx.Client(base_url=base, timeout=60) as client:
        for n, body in enumerate(bodies):
            token = tokens[n % len(tokens)]
            for path in (GATED, UNGATED) if n % 2 == 0 else (UNGATED, GATED):
                latencies[path].append(_post(client, path, token, body))
    return {path: sorted(lat) for path, lat in latencies.items()}


def _p(latencies: list[float], q: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * q))]


class Latency(NamedTuple):
    """One-at-a-time rounds: pooled latencies per path, and each round's p50 figures."""

    pooled: dict[str, list[float]]
    ratios: list[float]  # gate-on p50 / gate-off p50 - 1, per round
    added: list[float]  # gate-on p50 - gate-off p50, seconds, per round


def latency(base: str, tokens: list[str], bodies: list[dict], rounds: int) -> Latency:
    fire_pairs(base, tokens, bodies[: max(20, len(bodies) // 4)])  # warm every thread
    pooled: dict[str, list[float]] = {GATED: [], UNGATED: []}
    ratios, added = [], []
    for n in range(rounds):
        lat = fire_pairs(base, tokens, bodies)
        on, off = _p(lat[GATED], 0.5), _p(lat[UNGATED], 0.5)
        ratios.append(on / off - 1)
        added.append(on - off)
        for path in pooled:
            pooled[path] += lat[path]
        print(f"  one at a time, round {n + 1}/{rounds}: p50 gate on {on * 1e3:.2f} ms, "
              f"off {off * 1e3:.2f} ms: {ratios[-1]:+.1%}", flush=True)  # fmt: skip
    return Latency({path: sorted(lat) for path, lat in pooled.items()}, ratios, added)


def capacity(base: str, tokens: list[str], bodies: list[dict], rounds: int, concurrency: int):
    """Gate on and off in alternating rounds of ``concurrency`` requests at once:
    (req/s medians, pooled latencies)."""
    rates: dict[str, list[float]] = {GATED: [], UNGATED: []}
    pooled: dict[str, list[float]] = {GATED: [], UNGATED: []}
    for path in (GATED, UNGATED):  # warm every worker: imports, encodings, scripts
        fire(base, path, tokens, bodies, concurrency)
    for n in range(rounds):
        for path in (UNGATED, GATED) if n % 2 else (GATED, UNGATED):
            rate, lat = fire(base, path, tokens, bodies, concurrency)
            rates[path].append(rate)
            pooled[path] += lat
        print(f"  {concurrency} at once, round {n + 1}/{rounds}: gate on "
              f"{rates[GATED][-1]:,.0f} req/s, off {rates[UNGATED][-1]:,.0f} req/s",
              flush=True)  # fmt: skip
    medians = {path: statistics.median(r) for path, r in rates.items()}
    return medians, {path: sorted(lat) for path, lat in pooled.items()}


def _spread(ratios: list[float]) -> str:
    return f"{min(ratios):+.0%}..{max(ratios):+.0%}"


def report_latency(table: Table, label: str, result: Latency, note: str) -> None:
    on, off = result.pooled[GATED], result.pooled[UNGATED]
    table.add("4 end-to-end", f"{label}: gate off / on, p50 (pooled)",
              f"{_p(off, 0.5) * 1e3:.2f} / {_p(on, 0.5) * 1e3:.2f} ms", note)  # fmt: skip
    table.add("4 end-to-end", f"{label}: gate off / on, p99 (pooled)",
              f"{_p(off, 0.99) * 1e3:.2f} / {_p(on, 0.99) * 1e3:.2f} ms")  # fmt: skip
    middle = statistics.median(result.ratios)
    table.add("4 end-to-end", f"{label}: latency the gate adds at p50 (median of rounds)",
              f"{middle:+.1%}", f"< 10%: {verdict(middle < 0.10)}; rounds "
              f"{_spread(result.ratios)}; "
              f"{statistics.median(result.added) * 1e3:+.2f} ms")  # fmt: skip


def in_process_pass(client, path: str, bodies: list[str], tokens: list[str]) -> float:
    """Seconds per request for ``bodies`` posted to ``path`` through Django's test client,
    the users' tokens taken in turn; anything but a 200 stops the benchmark."""
    start = time.perf_counter()
    for n, body in enumerate(bodies):
        bearer = f"Bearer {tokens[n % len(tokens)]}"
        response = client.post(path, body, content_type="application/json",
                               HTTP_AUTHORIZATION=bearer)  # fmt: skip
        if response.status_code != 200:
            raise RuntimeError(f"{path}: {response.status_code} {response.content[:200]!r}")
    return (time.perf_counter() - start) / len(bodies)


def in_process(tokens: list[str], bodies: list[dict]) -> dict[str, list[float]]:
    """Seconds per request on each path per pass, one at a time through Django's test
    client, the paths in turns: the CPU and round trips each costs, without gunicorn,
    sockets or client threads."""
    from django.test import Client, override_settings
    from django_redis import get_redis_connection

    from llm_quota.ledger.default import get_ledger, set_default_ledger
    from llm_quota.ledger.sync_driver import Ledger

    client, previous = Client(), get_ledger()
    ledger = Ledger(get_redis_connection("default"), prefix=f"bench{uuid.uuid4().hex[:8]}",
                    restore=previous.restore_source)  # fmt: skip
    set_default_ledger(ledger)

    def one_pass(path: str) -> float:
        return in_process_pass(client, path, bodies, tokens)

    try:
        with override_settings(ROOT_URLCONF="tests.benchmarks.ungated"):
            for path in (GATED, UNGATED):
                one_pass(path)
            samples: dict[str, list[float]] = {GATED: [], UNGATED: []}
            for n in range(IN_PROCESS_PASSES):
                for path in (UNGATED, GATED) if n % 2 else (GATED, UNGATED):
                    samples[path].append(one_pass(path))
    finally:
        set_default_ledger(previous)
        _cleanup(ledger.keyspace.prefix)
    return samples


def fake_provider_call(bodies: list[dict]) -> float:
    """Seconds one call to the built-in fake provider takes (median of passes): the
    upstream both paths wait for, so the denominator of the ratios above."""
    from llm_quota.testing.fake_provider import FakeProvider

    provider = FakeProvider()
    capped = [{**body, "max_tokens": 64} for body in bodies]

    def one_pass() -> float:
        start = time.perf_counter()
        for body in capped:
            provider.complete(body)
        return (time.perf_counter() - start) / len(capped)

    one_pass()
    return statistics.median(one_pass() for _ in range(IN_PROCESS_PASSES))


def run(table: Table) -> None:
    with gunicorn() as (base, tokens):
        result = latency(base, tokens, _bodies(PAIRS), ROUNDS)
        rates, lat = capacity(base, tokens, _bodies(PER_ROUND), SAT_ROUNDS, SATURATION)
    where = f"gunicorn {WORKERS}x{THREADS} threads, fake provider"
    report_latency(table, "one at a time", result,
                   f"{where}; {ROUNDS}x{PAIRS} on/off pairs, ABBA")  # fmt: skip
    on, off = lat[GATED], lat[UNGATED]
    table.add("4 end-to-end", f"{SATURATION} at once: gate off / on, requests/s (median)",
              f"{rates[UNGATED]:,.0f} / {rates[GATED]:,.0f}/s",
              f"{rates[GATED] / rates[UNGATED]:.2f}x of gate off (capacity); "
              f"{SAT_ROUNDS}x{PER_ROUND} a side")  # fmt: skip
    table.add("4 end-to-end", f"{SATURATION} at once: gate off / on, p50 (pooled)",
              f"{_p(off, 0.5) * 1e3:.1f} / {_p(on, 0.5) * 1e3:.1f} ms",
              f"{_p(on, 0.5) / _p(off, 0.5) - 1:+.0%}: mostly queueing for the 2 cores",
              )  # fmt: skip
    each = in_process(tokens, _bodies(PER_ROUND // 2))
    on_ms, off_ms = (statistics.median(each[path]) * 1e3 for path in (GATED, UNGATED))
    own = [(g - u) * 1e3 for g, u in zip(each[GATED], each[UNGATED], strict=True)]
    table.add("4 end-to-end", "in process, one at a time: gate off / on, per request",
              f"{off_ms:.2f} / {on_ms:.2f} ms",
              f"the gate's own cost {on_ms - off_ms:.2f} ms ({on_ms / off_ms - 1:+.0%}); "
              f"passes {min(own):.2f}..{max(own):.2f} ms")  # fmt: skip
    provider = fake_provider_call(_bodies(PER_ROUND // 2))
    table.add("4 end-to-end", "fake provider: one call, in process", f"{provider * 1e3:.2f} ms",
              "CPU only (token counting), no network wait")  # fmt: skip
    _with_network_delay(table)


def _upstream_call(url: str) -> float:
    """Seconds the slow upstream takes to answer, called directly (median)."""
    body = _bodies(1, SLOW_MODEL)[0]
    with httpx.Client(base_url=url, timeout=60) as client:
        times = []
        for _ in range(10):
            start = time.perf_counter()
            client.post("chat/completions", json=body).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _with_network_delay(table: Table) -> None:
    import tests.support.fake_upstream as fake_upstream

    fake_upstream.LATENCY = SLOW_LATENCY
    upstream = fake_upstream.UpstreamServer().start()
    try:
        answers = _upstream_call(upstream.url)
        with gunicorn(upstream.url) as (base, tokens):
            result = latency(base, tokens, _bodies(SLOW_PAIRS, SLOW_MODEL), SLOW_ROUNDS)
            rates, _lat = capacity(
                base, tokens, _bodies(PER_ROUND, SLOW_MODEL), SLOW_ROUNDS, SLOW_CONCURRENCY
            )
    finally:
        upstream.stop()
    delay = f"upstream {SLOW_LATENCY * 1e3:.0f} ms"
    report_latency(table, delay, result, f"{SLOW_ROUNDS}x{SLOW_PAIRS} on/off pairs, ABBA; "
                   f"the upstream alone answers in {answers * 1e3:.1f} ms")  # fmt: skip
    table.add("4 end-to-end", f"{delay}, {SLOW_CONCURRENCY} at once: gate off / on, requests/s",
              f"{rates[UNGATED]:,.0f} / {rates[GATED]:,.0f}/s",
              f"{rates[GATED] / rates[UNGATED]:.2f}x of gate off; "
              f"{SLOW_ROUNDS}x{PER_ROUND} a side")  # fmt: skip
