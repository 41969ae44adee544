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
from contextlib import ExitStack, contextmanager
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
        proc.wait(timeout=10)


def _clients(url: str, count: int, ramp: float, deadline: float, tokens: Path, cap: int):
    """Run the client, in one process per thousand streams; (streams, wall, CPU)."""
    processes = max(1, math.ceil(count / 1000))
    shares = [count // processes + (n < count % processes) for n in range(processes)]
    client = [sys.executable, "-m", "tests.benchmarks.stream_ends", "client", url]
    procs = [
        subprocess.Popen(
            [*client, *map(str, (share, ramp, deadline, tokens, cap))],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for share in shares
    ]
    streams, wall, cpu = [], 0.0, 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=deadline + 60)
        result = json.loads(out)
        streams += result["streams"]
        wall, cpu = max(wall, result["wall"]), cpu + result["cpu"]
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


def _measure(
    phase: Phase,
    url: str,
    pid: int | None,
    tokens: Path,
    options: argparse.Namespace,
    lag_dir: Path | None = None,
) -> None:
    cap = round(options.length / options.interval) + 16
    cutoff = CUTOFF if phase.path == "sync" else 60.0
    deadline = options.ramp + options.length + cutoff
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
    phase.streams, phase.wall, phase.client_cpu = _clients(
        url, phase.count, options.ramp, deadline, tokens, cap
    )
    if pid is not None:
        phase.server_cpu = cpu_seconds(pid) - cpu
        peak.stop.set()
        peak.join()
        phase.rss = (phase.rss[0], peak.peak)
        if lag_dir is not None:
            phase.lag = _lag(lag_dir, began, time.monotonic())
    print(f"  {phase.path} x{phase.count}: {phase.errors} errors, TTFT p50 "
          f"{_ms(phase.ttft(0.5))} p99 {_ms(phase.ttft(0.99))} ms, client CPU "
          f"{phase.client_cpu / phase.wall:.0%} of a core, load {phase.load:.1f}",
          flush=True)  # fmt: skip


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _report(table: Table, phase: Phase, direct: Phase, goals: bool) -> None:
    name = f"{phase.path}, {phase.count} streams"
    refused = [s["error"] for s in phase.streams if s["error"]]
    table.add(SECTION, f"{name}: errors (or no [DONE])", f"{phase.errors} of {phase.count}",
              ("goal 0: " + ("met" if phase.errors == 0 else "NOT met") if goals else "")
              + (f" first: {refused[0][:60]}" if refused else ""))  # fmt: skip
    p50, p99, d50, d99 = phase.ttft(0.5), phase.ttft(0.99), direct.ttft(0.5), direct.ttft(0.99)
    added = (
        f" (+{_ms(p50 - d50)} / +{_ms(p99 - d99)})"
        if None not in (p50, p99, d50, d99) and phase is not direct else ""
    )  # fmt: skip
    goal = ""
    if goals and p99 is not None and d99 is not None:
        goal = "added p99 < 50 ms: " + ("met" if p99 - d99 < 0.05 else "NOT met")
    started = sum(1 for s in phase.streams if s["ttft"] is not None)
    table.add(SECTION, f"{name}: first event p50 / p99 ms (added)",
              f"{_ms(p50)} / {_ms(p99)}{added}",
              goal or f"{started} of {phase.count} had a first event")  # fmt: skip
    gaps = phase.gaps()
    if gaps:
        table.add(SECTION, f"{name}: gap between events p99 / max",
                  f"{_ms(_p(gaps, 0.99))} / {_ms(gaps[-1])} ms",
                  f"sent every {INTERVAL * 1e3:.0f} ms; client CPU "
                  f"{phase.client_cpu / phase.wall:.0%} of a core")  # fmt: skip
    if phase.server_cpu is not None and phase.rss is not None and started:
        before, peak = phase.rss
        table.add(SECTION, f"{name}: server CPU per stream served; memory per stream",
                  f"{phase.server_cpu / started * 1e3:.1f} ms; "
                  f"{(peak - before) / phase.count / 1024:.0f} KiB",
                  f"RSS {before / 2**20:.0f} → {peak / 2**20:.0f} MiB, "
                  f"load {phase.load:.1f}")  # fmt: skip
        events = sum(s["events"] for s in phase.streams)
        table.add(SECTION, f"{name}: server CPU per event relayed; CPU used",
                  f"{phase.server_cpu / max(events, 1) * 1e6:.0f} µs; "
                  f"{phase.server_cpu / phase.wall:.2f} cores",
                  f"{events} events in {phase.wall:.0f} s")  # fmt: skip
    if phase.lag:
        table.add(SECTION, f"{name}: event-loop lag p99 / max",
                  f"{_p(phase.lag, 0.99):.1f} / {phase.lag[-1]:.1f} ms",
                  f"{len(phase.lag)} samples of a 50 ms sleep, both workers")  # fmt: skip
    if phase.left is not None:
        reserved, flying = phase.left
        met = "goal 0: " + ("met" if phase.left == (0, 0) else "NOT met")
        table.add(SECTION, f"{name}: reserved / in flight after the run",
                  f"{reserved} / {flying}", met if goals else "")  # fmt: skip


def run(table: Table, options: argparse.Namespace | None = None) -> None:
    from django.core.management import call_command

    options = options or parse(shlex.split(os.environ.get(OPTIONS, "")))
    raise_fd_limit()  # the servers inherit it
    call_command("migrate", verbosity=0, interactive=False)
    user_ids, tokens = _seed()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="llmq-streams-") as scratch:
        token_file = Path(scratch) / "tokens"
        token_file.write_text("\n".join(tokens))
        stack.callback(_cleanup, prefix)
        _pid, upstream_url = stack.enter_context(_upstream(options.length, options.interval))
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "0",
               "LLM_QUOTA_KEY_PREFIX": prefix, "OPENAI_BASE_URL": upstream_url,
               "OPENAI_API_KEY": "bench"}  # fmt: skip
        for count in options.counts:
            direct = Phase("direct", count)
            _measure(direct, upstream_url, None, token_file, options)
            _report(table, direct, direct, False)
            paths = ["async"] + (["sync"] if count in options.sync_counts else [])
            for path in paths:
                phase = Phase(path, count)
                lag_dir = Path(scratch) / f"lag-{path}-{count}"
                lag_dir.mkdir()
                port = spare_port()
                served = {**env, "LLMQ_BENCH_LAG_DIR": str(lag_dir)}
                with server(_commands(port)[path], served, port) as (pid, url):
                    _measure(phase, f"{url}/v1", pid, token_file, options, lag_dir)
                    phase.left = _left(user_ids, prefix)
                _report(table, phase, direct, goals=path == "async" and count <= 1000)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.long_streams")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--sync-counts", type=int, nargs="*", default=list(SYNC_COUNTS))
    parser.add_argument("--length", type=float, default=LENGTH, help="seconds per stream")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="seconds per chunk")
    parser.add_argument("--ramp", type=float, default=RAMP, help="seconds to open them all")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """The benchmark runner with only this section, on these options."""
    from tests.benchmarks.__main__ import main as bench

    parse(argv)  # --help, and errors, before any set-up
    os.environ[OPTIONS] = shlex.join(argv)
    return bench(["streams"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
