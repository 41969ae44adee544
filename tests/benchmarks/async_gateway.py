"""Section 10: the async gateway (uvicorn) beside the sync one (gunicorn), in one run.

Both servers run at once on the same Redis, database and stdlib fake upstream
(``up-normal``: a small completion, no wait), 2 workers each as the operations page
deploys them: gunicorn 2x8 threads, uvicorn 2 workers on uvloop with httptools. The
client sends the same bodies to each in alternating rounds, so a load change on a
shared machine hits both alike. Per path it reports:

- **CPU per request**: the user + system time of the server's processes (read from
  ``/proc`` before and after a round) over the requests served: the steadiest figure
  on a shared machine, since other processes' load stretches wall time, not this;
- **one at a time**: the p50 and p99 of sequential calls on one keep-alive connection,
  and what the path adds over calling the upstream directly (also interleaved);
- **16 at once**: requests per second and p50/p99.

A third server is the async one on Django's own ``ASGIHandler`` (``django_asgi``): a
fresh thread per request, where ``project.asgi`` keeps one (``llm_quota.gateway.asgi``).
A fourth has only ``LLMQuotaMiddleware`` (``project.gateway_settings``): the price of the demo's
seven ``MiddlewareMixin`` middleware, two thread hops each under ASGI.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx

from tests.benchmarks.end_to_end import _bodies, _p, _post, fire
from tests.benchmarks.measure import Table
from tests.loadtest.harness import ROOT, _cleanup, wait_for_port
from tests.support.ports import spare_port

MODEL, USERS, WORKERS, THREADS, CONCURRENCY = "up-normal", 16, 2, 8, 16
ROUNDS, SEQUENTIAL, PER_ROUND = 4, 150, 600
PATH = "/v1/chat/completions"
TICKS = os.sysconf("SC_CLK_TCK")


def seed_users(
    label: str, count: int, model: str = MODEL, tokens: int = 10**9, concurrent: int = 10**4
) -> tuple[list[Any], list[str]]:
    """``count`` users on a fresh tier that no bench call reaches a limit of (``tokens``
    a minute, ten times that a day, a hundred times a month), ``model`` priced, and
    their access tokens: a bench measures the path, not a refusal. The burn-rate breaker
    is off: a bench's thousands of calls a minute are a runaway loop by its measure."""
    from django.contrib.auth import get_user_model

    from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
    from llm_quota.models import ModelPrice, Tier, UserQuota

    run = uuid.uuid4().hex[:6]
    tier = Tier.objects.create(
        name=f"{label}-{run}", allowed_models="", requests_per_minute=10**6,
        tokens_per_minute=tokens, tokens_per_day=tokens * 10, tokens_per_month=tokens * 100,
        max_concurrent_requests=concurrent,
        burn_multiplier=None, burn_floor=None, burn_pause_seconds=None,
    )  # fmt: skip
    ModelPrice.objects.update_or_create(
        model=model, defaults=dict(input_multiplier=Decimal("1"), output_multiplier=Decimal("4"),
                                   default_max_output_tokens=64),
    )  # fmt: skip
    ids, access = [], []
    for n in range(count):
        user = get_user_model().objects.create_user(f"{label}-{run}-{n}")
        UserQuota.objects.create(user=user, tier=tier)
        ids.append(user.pk)
        access.append(str(ScopedTokenObtainPairSerializer.get_token(user).access_token))
    return ids, access


def _seed() -> list[str]:
    return seed_users("bench-async", USERS)[1]


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants (the server's master and workers)."""
    pids, found = [pid], [pid]
    while found:
        children = []
        for parent in found:
            try:
                with open(f"/proc/{parent}/task/{parent}/children") as listing:
                    children += [int(child) for child in listing.read().split()]
            except OSError:
                pass
        pids += children
        found = children
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a server's processes so far."""
    total = 0
    for member in _family(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


@contextmanager
def server(
    command: list[str], env: dict, port: int, output: IO | None = None, timeout: float = 60,
    cwd: Path = ROOT,
):  # fmt: skip
    """(pid, base url) of ``command``, run in ``cwd``, listening on ``port`` within
    ``timeout`` s; its whole process group is stopped on exit. ``output`` takes its
    stdout and stderr (a banner-printing peer)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True,
                            stdout=output, stderr=output)  # fmt: skip
    try:
        wait_for_port(port, timeout=timeout)
        yield proc.pid, f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def commands(port_sync: int, port_async: int, app: str = "project.asgi") -> dict[str, list[str]]:
    return {
        "sync": [sys.executable, "-m", "gunicorn", "project.wsgi", "-w", str(WORKERS),
                 "-k", "gthread", "--threads", str(THREADS), "-b", f"127.0.0.1:{port_sync}",
                 "--log-level", "warning"],
        "async": [sys.executable, "-m", "uvicorn", f"{app}:application",
                  "--workers", str(WORKERS), "--loop", "uvloop", "--http", "httptools",
                  "--host", "127.0.0.1", "--port", str(port_async),
                  "--no-access-log", "--log-level", "warning"],
    }  # fmt: skip


def sequential(client: httpx.Client, tokens: list[str], bodies: list[dict], path: str) -> list:
    """Seconds per call, one at a time on one connection (no tokens: the upstream)."""
    return [
        _post(client, path, tokens[n % len(tokens)] if tokens else None, body)
        for n, body in enumerate(bodies)
    ]


@contextmanager
def environment(stack: ExitStack) -> Iterator[tuple[dict, list[str], str]]:
    """(the servers' environment, tokens, upstream url): seeded users and a running fake
    upstream, both gone (and the run's Redis keys) when ``stack`` closes."""
    from django.core.management import call_command

    import tests.support.fake_upstream as fake_upstream

    call_command("migrate", verbosity=0, interactive=False)
    tokens = _seed()
    upstream = fake_upstream.UpstreamServer().start()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "0",
           "LLM_QUOTA_KEY_PREFIX": prefix, "OPENAI_BASE_URL": upstream.url,
           "OPENAI_API_KEY": "bench"}  # fmt: skip
    stack.callback(_cleanup, prefix)
    stack.callback(upstream.stop)
    yield env, tokens, upstream.url


@contextmanager
def stack():
    """(servers: name → (pid, url), tokens, upstream url), both servers up."""
    with ExitStack() as stack:
        env, tokens, upstream_url = stack.enter_context(environment(stack))
        port_sync = spare_port()
        sync = stack.enter_context(server(commands(port_sync, 0)["sync"], env, port_sync))
        port_async = spare_port()
        aio = stack.enter_context(server(commands(0, port_async)["async"], env, port_async))
        port_fresh = spare_port()
        fresh_command = commands(0, port_fresh, "tests.benchmarks.django_asgi")["async"]
        fresh = stack.enter_context(server(fresh_command, env, port_fresh))
        port_lean = spare_port()
        lean_env = {**env, "DJANGO_SETTINGS_MODULE": "project.gateway_settings"}
        lean = stack.enter_context(server(commands(0, port_lean)["async"], lean_env, port_lean))
        servers = {"sync": sync, "async": aio, "async, Django's ASGIHandler": fresh,
                   "async, lean middleware": lean}  # fmt: skip
        yield servers, tokens, upstream_url


def run(table: Table) -> None:
    bodies = _bodies(PER_ROUND, MODEL)
    with stack() as (servers, tokens, upstream_url):
        cpu = {name: [] for name in servers}
        seq = {name: [] for name in (*servers, "direct")}
        rates = {name: [] for name in servers}
        lat = {name: [] for name in servers}
        for _pid, url in servers.values():  # warm both workers of each
            fire(url, PATH, tokens, bodies[:200], CONCURRENCY)
        for n in range(ROUNDS):
            order = list(servers)[n % len(servers) :] + list(servers)[: n % len(servers)]
            for name in order:
                pid, url = servers[name]
                with httpx.Client(base_url=url, timeout=60) as client:
                    seq[name] += sequential(client, tokens, bodies[:SEQUENTIAL], PATH)
                before = cpu_seconds(pid)
                rate, latencies = fire(url, PATH, tokens, bodies, CONCURRENCY)
                cpu[name].append((cpu_seconds(pid) - before) / len(bodies))
                rates[name].append(rate)
                lat[name] += latencies
            with httpx.Client(base_url=upstream_url, timeout=60) as client:
                seq["direct"] += sequential(client, [], bodies[:SEQUENTIAL], "chat/completions")
            print(f"  round {n + 1}/{ROUNDS}: " + ", ".join(
                f"{name} {cpu[name][-1] * 1e3:.2f} ms CPU, {rates[name][-1]:.0f} req/s"
                for name in servers), flush=True)  # fmt: skip
    direct = statistics.median(seq["direct"])
    for name in servers:
        ordered, one = sorted(lat[name]), sorted(seq[name])
        table.add("10 async gateway", f"{name}: gateway CPU per request (median of rounds)",
                  f"{statistics.median(cpu[name]) * 1e3:.2f} ms",
                  f"rounds {min(cpu[name]) * 1e3:.2f}..{max(cpu[name]) * 1e3:.2f} ms")  # fmt: skip
        table.add("10 async gateway", f"{name}: one at a time, added p50 / p99",
                  f"+{(_p(one, 0.5) - direct) * 1e3:.2f} / {_p(one, 0.99) * 1e3:.2f} ms",
                  f"upstream direct p50 {direct * 1e3:.2f} ms")  # fmt: skip
        table.add("10 async gateway", f"{name}: {CONCURRENCY} at once, req/s; p50 / p99",
                  f"{statistics.median(rates[name]):.0f}/s; "
                  f"{_p(ordered, 0.5) * 1e3:.1f} / {_p(ordered, 0.99) * 1e3:.1f} ms",
                  f"{ROUNDS}x{PER_ROUND} a side, interleaved")  # fmt: skip
