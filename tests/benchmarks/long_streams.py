"""Section 11: long streams, hundreds to thousands at once, through each gateway.

``python -m tests.benchmarks streams`` runs the defaults; ``python -m
tests.benchmarks.long_streams --counts 100 --sync-counts 100 --length 5`` a quick one.

N streamed chat completions, each ``LENGTH`` seconds long with a chunk every
``INTERVAL`` (a fake model in its own process, ``stream_ends upstream``), are opened
at an even pace over ``RAMP`` seconds, so that all N are open together for the last
``LENGTH - RAMP`` seconds of the first ones. The client (``stream_ends client``, one
process per thousand streams) opens a connection per stream. For each N the same load
goes, one after the other, each against freshly started servers:

- **direct** to the fake model: the baseline every "added" figure is measured from;
- **async**: the demo under uvicorn, 2 workers on uvloop with httptools, as the
  operations page deploys it (``stream_asgi``: the same application, plus a sampler of
  each worker's event-loop lag);
- **sync**: gunicorn, 2 workers x 8 threads, for the counts in ``SYNC_COUNTS``. A
  stream holds a thread for its whole length, so 16 are served at a time and the rest
  queue: the client cuts them ``CUTOFF`` seconds after the last should have ended.

Per path and N it reports errors (a status other than 200, an ``error`` event, or no
``[DONE]``), time to the first event (p50 / p99, and added over direct at the same
percentile), the p99 and largest gap between two events, the server's CPU per stream
(over the streams that had a first event: the sync path serves only some), memory per
stream (the workers' peak RSS during the run less their RSS just before it,
over N), the server's CPU per event relayed and in all (cores used over the run: near
2, the workers had all the machine's CPU; well below, with errors or delays, other
processes held it), the event-loop lag (how late a 50 ms sleep woke, p99 and worst, over the
run), and, once every client is done, what the ledger still holds: the base tokens
reserved and the calls in flight over every user, which must both come back to 0.

The peers bench (``tests.benchmarks.peers``) runs the same phases with LiteLLM as one
more path, so the parts are its too: ``prepared`` (the run's users, fake model and
environment), a path as a ``Serve`` (``direct``, ``ours(kind)``), ``measure`` (one
phase), ``figures`` (its row) and ``markdown`` (the table, blank where a path has no
figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.benchmarks.async_gateway import _family, cpu_seconds, seed_users, server
from tests.benchmarks.end_to_end import _p
from tests.benchmarks.measure import Table
from tests.benchmarks.stream_ends import MODEL, raise_fd_limit
from tests.loadtest.harness import ROOT, _cleanup, wait_for_port
from tests.support.ports import spare_port

COUNTS = (100, 500, 1000, 2000)
SYNC_COUNTS = (100, 500)
LENGTH, INTERVAL, RAMP = 20.0, 0.1, 10.0
CUTOFF = 5.0  # seconds the sync path gets past the end of the last stream
USERS, WORKERS, THREADS = 100, 2, 8
SECTION = "11 long streams"
#: This section's options for ``python -m tests.benchmarks streams`` (``--help``).
OPTIONS = "LLMQ_BENCH_STREAMS"


@dataclass
class Phase:
    """One path at one N: what the client saw and what the server spent."""

    path: str
    count: int
    streams: list[dict[str, Any]] = field(default_factory=list)
    client_cpu: float = 0.0
    wall: float = 0.0
    server_cpu: float | None = None
    rss: tuple[int, int] | None = None  # bytes: before, peak
    lag: list[float] = field(default_factory=list)  # ms
    left: tuple[int, int] | None = None  # reserved, in flight
    load: float = 0.0

    @property
    def errors(self) -> int:
        return sum(1 for s in self.streams if s["error"] or not s["finished"])

    def ttft(self, q: float) -> float | None:
        times = sorted(s["ttft"] for s in self.streams if s["ttft"] is not None)
        return _p(times, q) if times else None

    def gaps(self) -> list[float]:
        return sorted(gap for s in self.streams for gap in s["gaps"])


@dataclass(frozen=True)
class Served:
    """A path as the client sees it while it serves one phase."""

    url: str  # the base the client appends ``/chat/completions`` to
    pid: int | None  # the server whose processes' CPU and RSS are read (None: direct)
    tokens: Path  # the bearers the client sends, one a line
    lag_dir: Path | None = None  # where an app with a loop-lag sampler writes it
    ledger: bool = False  # ours: read what the ledger still holds once the client is done
    cutoff: float = 60.0  # seconds the client waits past the last stream's end


@dataclass
class Run:
    """What every phase of one run shares: its options, seeded users and their tokens,
    the fake model, and the environment our servers start in."""

    options: argparse.Namespace
    user_ids: list[Any]
    tokens: Path
    upstream_url: str
    env: dict[str, str]
    prefix: str
    scratch: Path


#: A path to the fake model: given the run and N, a context that serves the phase
#: (starting a server if the path needs one, stopping it on exit).
Serve = Callable[[Run, int], AbstractContextManager[Served]]


def _seed() -> tuple[list[Any], list[str]]:
    """Users on a tier no stream hits a limit of: the bench measures the stream path."""
    return seed_users("bench-streams", USERS, MODEL, tokens=10**10, concurrent=10**5)


def _commands(port: int) -> dict[str, list[str]]:
    return {
        "sync": [sys.executable, "-m", "gunicorn", "project.wsgi", "-w", str(WORKERS),
                 "-k", "gthread", "--threads", str(THREADS), "-b", f"127.0.0.1:{port}",
                 "--log-level", "warning"],
        "async": [sys.executable, "-m", "uvicorn", "tests.benchmarks.stream_asgi:application",
                  "--workers", str(WORKERS), "--loop", "uvloop", "--http", "httptools",
                  "--host", "127.0.0.1", "--port", str(port), "--backlog", "4096",
                  "--no-access-log", "--log-level", "warning"],
    }  # fmt: skip


@contextmanager
def _upstream(length: float, interval: float):
    port = spare_port()
    command = [sys.executable, "-m", "tests.benchmarks.stream_ends", "upstream", str(port),
               str(interval), str(length)]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield proc.pid, f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _clients(url: str, count: int, ramp: float, deadline: float, tokens: Path, cap: int):
    """Run the client, in one process per thousand streams; (streams, wall, CPU)."""
    processes = max(1, math.ceil(count / 1000))
    shares = [count // processes + (n < count % processes) for n in range(processes)]
    client = [sys.executable, "-m", "tests.benchmarks.stream_ends", "client", url]
    procs: list[subprocess.Popen[bytes]] = []
    streams, wall, cpu = [], 0.0, 0.0
    try:
        for share in shares:
            procs.append(subprocess.Popen(
                [*client, *map(str, (share, ramp, deadline, tokens, cap))],
                cwd=ROOT, stdout=subprocess.PIPE,
            ))  # fmt: skip
        for proc in procs:
            out, _ = proc.communicate(timeout=deadline + 60)
            result = json.loads(out)
            streams += result["streams"]
            wall, cpu = max(wall, result["wall"]), cpu + result["cpu"]
    finally:  # a failed or interrupted phase leaves no client behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return streams, wall, cpu


def _rss(pid: int) -> int:
    """Resident bytes of a server's workers (its descendants)."""
    total = 0
    for member in _family(pid)[1:]:
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class RssPeak(threading.Thread):
    """The highest worker RSS seen while the load runs, sampled four times a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.peak = max(self.peak, _rss(self.pid))


def _left(user_ids: list[Any], prefix: str, wait: float = 15.0) -> tuple[int, int]:
    """(base tokens reserved, calls in flight) over every user, once both are 0 or
    ``wait`` seconds have passed: a settle may land a moment after the last byte."""
    from django.conf import settings
    from django.test import override_settings

    from llm_quota.ledger.default import get_ledger

    with override_settings(LLM_QUOTA={**settings.LLM_QUOTA, "KEY_PREFIX": prefix}):
        deadline = time.monotonic() + wait
        while True:
            usage = get_ledger().usage_many(user_ids).values()
            left = sum(u.reserved for u in usage), sum(u.in_flight for u in usage)
            if left == (0, 0) or time.monotonic() > deadline:
                return left
            time.sleep(0.5)


def _lag(folder: Path, since: float, until: float) -> list[float]:
    lags = []
    for path in folder.iterdir():
        for line in path.read_text().splitlines():
            stamp, lag = line.split()
            if since <= float(stamp) <= until:
                lags.append(float(lag))
    return sorted(lags)


def _measure(phase: Phase, served: Served, options: argparse.Namespace) -> None:
    cap = round(options.length / options.interval) + 16
    deadline = options.ramp + options.length + served.cutoff
    url, pid, tokens = served.url, served.pid, served.tokens
    peak: RssPeak | None = None
    if pid is not None:
        # Warm every worker for every user (short streams): the first call of a user on
        # a worker reads the user, tier and price from the database into its config
        # cache; measured here is the steady state, not those reads.
        _clients(url, 4 * USERS * WORKERS, 4, 60, tokens, 2)
        time.sleep(1)
        phase.rss = (_rss(pid), 0)
        cpu = cpu_seconds(pid)
        peak = RssPeak(pid)
        peak.start()
    phase.load = os.getloadavg()[0]
    began = time.monotonic()
    try:
        phase.streams, phase.wall, phase.client_cpu = _clients(
            url, phase.count, options.ramp, deadline, tokens, cap
        )
    finally:
        if peak is not None:
            peak.stop.set()
            peak.join()
    if peak is not None and phase.rss is not None:
        phase.server_cpu = cpu_seconds(pid) - cpu
        phase.rss = (phase.rss[0], peak.peak)
        if served.lag_dir is not None:
            phase.lag = _lag(served.lag_dir, began, time.monotonic())
    print(f"  {phase.path} x{phase.count}: {phase.errors} errors, TTFT p50 "
          f"{_ms(phase.ttft(0.5))} p99 {_ms(phase.ttft(0.99))} ms, client CPU "
          f"{phase.client_cpu / phase.wall:.0%} of a core, load {phase.load:.1f}",
          flush=True)  # fmt: skip


def measure(run: Run, name: str, serve: Serve, count: int) -> Phase:
    """``count`` streams through one path (``serve``), named ``name`` in the report."""
    phase = Phase(name, count)
    with serve(run, count) as served:
        _measure(phase, served, run.options)
        if served.ledger:
            phase.left = _left(run.user_ids, run.prefix)
    return phase


@contextmanager
def direct(run: Run, count: int) -> Iterator[Served]:
    """The client straight to the fake model: the baseline of every "added" figure."""
    yield Served(run.upstream_url, None, run.tokens)


def ours(kind: str, extra_env: dict[str, str] | None = None) -> Serve:
    """Our app on ``kind``'s server ("async": uvicorn, ``stream_asgi`` with its lag
    sampler; "sync": gunicorn), started afresh for each phase and stopped after it,
    with ``extra_env`` in its environment."""

    @contextmanager
    def serve(run: Run, count: int) -> Iterator[Served]:
        # A folder of its own: a run may serve the same kind at the same N twice.
        lag_dir = Path(tempfile.mkdtemp(prefix=f"lag-{kind}-{count}-", dir=run.scratch))
        port = spare_port()
        env = {**run.env, "LLMQ_BENCH_LAG_DIR": str(lag_dir), **(extra_env or {})}
        with server(_commands(port)[kind], env, port) as (pid, url):
            yield Served(f"{url}/v1", pid, run.tokens, lag_dir, ledger=True,
                         cutoff=CUTOFF if kind == "sync" else 60.0)  # fmt: skip

    return serve


@contextmanager
def prepared(options: argparse.Namespace) -> Iterator[Run]:
    """The run's users (and their tokens in a file), the fake model in its own process,
    and our servers' environment; on exit the fake model stopped, the run's Redis keys
    and scratch files gone. Lifts the file limit first: servers started inside inherit it."""
    from django.core.management import call_command

    raise_fd_limit()
    call_command("migrate", verbosity=0, interactive=False)
    user_ids, tokens = _seed()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmq-streams-")))
        token_file = scratch / "tokens"
        token_file.write_text("\n".join(tokens))
        stack.callback(_cleanup, prefix)
        _pid, upstream_url = stack.enter_context(_upstream(options.length, options.interval))
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "0",
               "LLM_QUOTA_KEY_PREFIX": prefix, "OPENAI_BASE_URL": upstream_url,
               "OPENAI_API_KEY": "bench"}  # fmt: skip
        yield Run(options, user_ids, token_file, upstream_url, env, prefix, scratch)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _per(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def figures(phase: Phase, direct: Phase) -> dict[str, Any]:
    """One phase's figures, the table's and the plot's (ms, µs, KiB, cores), with None
    where the path has none: no server (direct), no loop-lag sampler (sync, a peer), no
    ledger (direct, a peer). ``direct`` is the same N's direct phase."""
    p50, p99, d50, d99 = phase.ttft(0.5), phase.ttft(0.99), direct.ttft(0.5), direct.ttft(0.99)
    added = phase is not direct and None not in (p50, p99, d50, d99)
    gaps = phase.gaps()
    started = sum(1 for s in phase.streams if s["ttft"] is not None)
    events = sum(s["events"] for s in phase.streams)
    refused = [s["error"] for s in phase.streams if s["error"]]
    row: dict[str, Any] = {
        "path": phase.path, "count": phase.count, "errors": phase.errors,
        "first error": refused[0] if refused else None, "started": started,
        "first p50": _per(p50, 1e3), "first p99": _per(p99, 1e3),
        "added p50": (p50 - d50) * 1e3 if added else None,
        "added p99": (p99 - d99) * 1e3 if added else None,
        "gap p99": _p(gaps, 0.99) * 1e3 if gaps else None,
        "gap max": gaps[-1] * 1e3 if gaps else None,
        "events": events, "wall": phase.wall,
        "client cores": phase.client_cpu / phase.wall if phase.wall else None,
        "cpu per stream": None, "cpu per event": None, "cores": None,
        "memory per stream": None, "rss before": None, "rss peak": None,
        "lag p99": _p(phase.lag, 0.99) if phase.lag else None,
        "lag max": phase.lag[-1] if phase.lag else None, "lag samples": len(phase.lag),
        "reserved": phase.left[0] if phase.left else None,
        "in flight": phase.left[1] if phase.left else None,
        "load": phase.load,
    }  # fmt: skip
    if phase.server_cpu is not None and phase.rss is not None and started:
        before, peak = phase.rss
        row.update({
            "cpu per stream": phase.server_cpu / started * 1e3,
            "cpu per event": phase.server_cpu / max(events, 1) * 1e6,
            "cores": phase.server_cpu / phase.wall if phase.wall else None,
            "memory per stream": (peak - before) / phase.count / 1024,
            "rss before": before / 2**20, "rss peak": peak / 2**20,
        })  # fmt: skip
    return row


def _report(table: Table, row: dict[str, Any], goals: bool) -> None:
    name = f"{row['path']}, {row['count']} streams"
    first_error = f" first: {row['first error'][:60]}" if row["first error"] else ""
    table.add(SECTION, f"{name}: errors (or no [DONE])", f"{row['errors']} of {row['count']}",
              ("goal 0: " + ("met" if row["errors"] == 0 else "NOT met") if goals else "")
              + first_error)  # fmt: skip
    added = (f" (+{row['added p50']:.1f} / +{row['added p99']:.1f})"
             if row["added p99"] is not None else "")  # fmt: skip
    goal = ""
    if goals and row["added p99"] is not None:
        goal = "added p99 < 50 ms: " + ("met" if row["added p99"] < 50 else "NOT met")
    table.add(SECTION, f"{name}: first event p50 / p99 ms (added)",
              f"{_num(row['first p50'])} / {_num(row['first p99'])}{added}",
              goal or f"{row['started']} of {row['count']} had a first event")  # fmt: skip
    if row["gap p99"] is not None:
        table.add(SECTION, f"{name}: gap between events p99 / max",
                  f"{row['gap p99']:.1f} / {row['gap max']:.1f} ms",
                  f"sent every {INTERVAL * 1e3:.0f} ms; client CPU "
                  f"{row['client cores']:.0%} of a core")  # fmt: skip
    if row["cpu per stream"] is not None:
        table.add(SECTION, f"{name}: server CPU per stream served; memory per stream",
                  f"{row['cpu per stream']:.1f} ms; {row['memory per stream']:.0f} KiB",
                  f"RSS {row['rss before']:.0f} → {row['rss peak']:.0f} MiB, "
                  f"load {row['load']:.1f}")  # fmt: skip
        table.add(SECTION, f"{name}: server CPU per event relayed; CPU used",
                  f"{row['cpu per event']:.0f} µs; {row['cores']:.2f} cores",
                  f"{row['events']} events in {row['wall']:.0f} s")  # fmt: skip
    if row["lag p99"] is not None:
        table.add(SECTION, f"{name}: event-loop lag p99 / max",
                  f"{row['lag p99']:.1f} / {row['lag max']:.1f} ms",
                  f"{row['lag samples']} samples of a 50 ms sleep, both workers")  # fmt: skip
    if row["reserved"] is not None:
        met = "goal 0: " + ("met" if (row["reserved"], row["in flight"]) == (0, 0) else "NOT met")
        table.add(SECTION, f"{name}: reserved / in flight after the run",
                  f"{row['reserved']} / {row['in flight']}", met if goals else "")  # fmt: skip


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pair(a: float | None, b: float | None, unit: str = " ms", digits: int = 1) -> str:
    """``a / b unit``, or a blank cell where the path has neither figure."""
    if a is None and b is None:
        return ""
    return f"{_num(a, digits)} / {_num(b, digits)}{unit}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The section's table, one line per phase (``figures``): a figure a path does not
    report (the loop lag of a server without the sampler, the ledger of a peer) is a
    blank cell."""
    lines = [
        "| N | path | errors | first event p50 / p99 (added p99) | event gap p99 / max "
        "| CPU per stream; per event | cores used | memory per stream | loop lag p99 / max "
        "| reserved / in flight after | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        errors = str(row["errors"])
        if row["started"] < row["count"]:
            errors += f" ({row['started']} of {row['count']} started)"
        first = _pair(row["first p50"], row["first p99"])
        if row["added p99"] is not None:
            first += f" (+{row['added p99']:,.1f})"
        cpu = (f"{row['cpu per stream']:.1f} ms; {row['cpu per event']:.0f} µs"
               if row["cpu per stream"] is not None else "")  # fmt: skip
        cores = f"{row['cores']:.2f}" if row["cores"] is not None else ""
        memory = (f"{row['memory per stream']:.0f} KiB"
                  if row["memory per stream"] is not None else "")  # fmt: skip
        left = (f"{row['reserved']} / {row['in flight']}"
                if row["reserved"] is not None else "")  # fmt: skip
        lines.append(
            f"| {row['count']:,} | {row['path']} | {errors} | {first} "
            f"| {_pair(row['gap p99'], row['gap max'])} | {cpu} | {cores} | {memory} "
            f"| {_pair(row['lag p99'], row['lag max'])} | {left} | {row['load']:.1f} |"
        )
    return "\n".join(lines)


#: ``--variant NAME``: the async path again, in the same run, with one of ``warm_up``'s
#: worker settings undone (``stream_asgi`` reads the variable: its before), or with only
#: the middleware the gateway uses (``project.gateway_settings``).
VARIANTS = {
    "unfrozen": ("async, gc not frozen", {"LLMQ_BENCH_GC": "unfrozen"}),
    "lean": ("async, only LLMQuotaMiddleware",
             {"DJANGO_SETTINGS_MODULE": "project.gateway_settings"}),
}  # fmt: skip


def run(table: Table, options: argparse.Namespace | None = None) -> None:
    options = options or parse(shlex.split(os.environ.get(OPTIONS, "")))
    rows = []
    with prepared(options) as streams:
        for count in options.counts:
            base = measure(streams, "direct", direct, count)
            rows.append(figures(base, base))
            _report(table, rows[-1], False)
            kinds = ["async"] + (["sync"] if count in options.sync_counts else [])
            for kind in kinds:
                phase = measure(streams, kind, ours(kind), count)
                rows.append(figures(phase, base))
                _report(table, rows[-1], goals=kind == "async" and count <= 1000)
            for variant in options.variant:
                name, extra_env = VARIANTS[variant]
                rows.append(figures(measure(streams, name, ours("async", extra_env), count), base))
                _report(table, rows[-1], False)
    print("\n" + markdown(rows), flush=True)


def add_options(parser: argparse._ActionsContainer, defaults: bool = True) -> None:
    """The section's options, with its defaults (or None: a caller with its own, as the
    peers bench; ``parser`` may be an argument group)."""

    def default(value: Any) -> Any:
        return value if defaults else None

    parser.add_argument("--counts", type=int, nargs="+", default=default(list(COUNTS)),
                        help="streams at once, one phase per path for each")  # fmt: skip
    parser.add_argument("--sync-counts", type=int, nargs="*", default=default(list(SYNC_COUNTS)),
                        help="the counts the sync path runs at too")  # fmt: skip
    parser.add_argument("--length", type=float, default=default(LENGTH), help="seconds per stream")
    parser.add_argument("--interval", type=float, default=default(INTERVAL),
                        help="seconds per chunk")  # fmt: skip
    parser.add_argument("--ramp", type=float, default=default(RAMP),
                        help="seconds to open them all")  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.long_streams")
    add_options(parser)
    parser.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                        help="also the async path configured so (VARIANTS)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """The benchmark runner with only this section, on these options."""
    from tests.benchmarks.__main__ import main as bench

    parse(argv)  # --help, and errors, before any set-up
    os.environ[OPTIONS] = shlex.join(argv)
    return bench(["streams"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
