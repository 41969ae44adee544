"""The peers bench: direct, ours (sync), ours (async) and LiteLLM, interleaved in one run.

Section 10's servers, seeding, CPU reading and request loops are reused as they are
(``async_gateway``, ``end_to_end``); this module adds the LiteLLM proxy, the streamed
variants, the long streams and the report. Per target and per round, in an order that
rotates every round so a load change on a shared machine hits every target alike:

- **one at a time** (non-streamed, then streamed): p50 and p99 of sequential calls on
  one keep-alive connection; "added" is the p50 less the direct p50 of the same run;
- **16 at once**: requests/s, and the gateway's CPU per request (user + system time of
  the server's processes from ``/proc``, over the requests served). Direct has no
  gateway, so no CPU figure.

Then the **long streams**: section 11 (``long_streams``) with LiteLLM as one more path.
Its fake model (``stream_ends upstream``) starts before LiteLLM, whose config routes
``up-stream`` to it, so the LiteLLM measured is the one started once for the run; ours
are started afresh for each phase as section 11 starts them. For each N (``Sizes``):
direct first (the baseline), then ours sync (at the counts in ``sync_counts``), ours
async and LiteLLM, their order rotated from one N to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.benchmarks import long_streams
from tests.benchmarks.async_gateway import (
    CONCURRENCY,
    MODEL,
    PATH,
    commands,
    cpu_seconds,
    environment,
    sequential,
    server,
)
from tests.benchmarks.end_to_end import _bodies, _p, fire
from tests.loadtest.harness import ROOT
from tests.support.ports import spare_port

HERE = Path(__file__).resolve().parent
PEERS_VENV = ROOT / "var" / "peers-venv"
DIRECT, SYNC, ASYNC, LITELLM = (
    "direct", "ours, gunicorn 2x8 threads", "ours, uvicorn 2 workers (async)", "LiteLLM proxy",
)  # fmt: skip
LITELLM_REDIS = "LiteLLM proxy, limits in Redis"
KINDS = ("plain", "stream")


@dataclass(frozen=True)
class Sizes:
    rounds: int
    sequential: int  # one-at-a-time calls per kind, target and round
    per_round: int  # calls at 16 at once per kind, target and round
    counts: tuple[int, ...]  # long streams at once: a phase per path for each
    sync_counts: tuple[int, ...]  # the counts the sync path runs at too
    length: float  # seconds per long stream
    ramp: float  # seconds to open them all
    interval: float = long_streams.INTERVAL  # seconds between chunks

    def streams(self) -> argparse.Namespace:
        """The long-stream section's options (``long_streams.parse``'s)."""
        return argparse.Namespace(counts=list(self.counts), sync_counts=list(self.sync_counts),
                                  length=self.length, interval=self.interval,
                                  ramp=self.ramp)  # fmt: skip


FULL = Sizes(rounds=3, sequential=150, per_round=600, counts=(100, 500), sync_counts=(100,),
             length=long_streams.LENGTH, ramp=long_streams.RAMP)  # fmt: skip
QUICK = Sizes(rounds=2, sequential=40, per_round=160, counts=(50,), sync_counts=(50,),
              length=5.0, ramp=2.0)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One path to the upstream: ``url`` + ``path``, a bearer per caller (none: the
    upstream itself), and the server's pid whose processes' CPU is read (none: direct)."""

    name: str
    url: str
    path: str
    tokens: list[str]
    pid: int | None

    def headers(self, n: int) -> dict[str, str]:
        if not self.tokens:
            return {}
        return {"Authorization": f"Bearer {self.tokens[n % len(self.tokens)]}"}


@dataclass
class Figures:
    """One target's samples of one kind (plain or stream), pooled over the rounds."""

    one: list[float] = field(default_factory=list)  # one at a time, seconds
    many: list[float] = field(default_factory=list)  # 16 at once, seconds
    rates: list[float] = field(default_factory=list)  # 16 at once, req/s per round
    cpu: list[float] = field(default_factory=list)  # CPU seconds per request, per round


# --- the servers ---------------------------------------------------------------------


def litellm_version() -> str:
    out = subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def litellm_command(port: int) -> list[str]:
    """As benchmarks.md describes it: 2 uvicorn workers (LiteLLM picks uvloop), the
    config beside this file, uvicorn's access log off. uvicorn kills a worker that does
    not answer its health-check ping within 5 s, and a LiteLLM worker still importing
    on a busy 2-core VM can miss it: it was killed and respawned for 5 minutes."""
    return [str(PEERS_VENV / "bin" / "litellm"), "--config", str(HERE / "litellm_config.yaml"),
            "--host", "127.0.0.1", "--port", str(port), "--num_workers", "2",
            "--log_config", str(HERE / "log_config.json"),
            "--timeout_worker_healthcheck", "300"]  # fmt: skip


def litellm_env(
    upstream_url: str, stream_url: str | None = None, redis_url: str | None = None
) -> dict[str, str]:
    """A clean environment: LiteLLM reads ``DATABASE_URL`` and would start Prisma, and
    fetches its model price map from the network unless told to use its own copy.
    ``stream_url`` is the long streams' fake model (``up-stream``; else the short
    requests' upstream, never called). With ``REDIS_URL`` its rpm/tpm counters are
    shared by its workers through that Redis (its "coordination Redis"), as ours always
    are; without, each worker counts alone."""
    kept = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    env = {**kept, "PEER_UPSTREAM_URL": upstream_url,
           "PEER_STREAM_UPSTREAM_URL": stream_url or upstream_url, "LITELLM_LOG": "ERROR",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # fmt: skip
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def wait_until_answers(target: Target, timeout: float = 180) -> None:
    """uvicorn binds the port before its workers have started the app (LiteLLM's take
    tens of seconds): wait for a real answer, from both workers."""
    body = _bodies(1, MODEL)[0]
    deadline = time.monotonic() + timeout
    answered = 0
    while answered < 4:
        try:
            with httpx.Client(base_url=target.url, timeout=30) as client:
                client.post(target.path, json=body, headers=target.headers(0)).raise_for_status()
            answered += 1
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@contextmanager
def targets(
    out: Path, litellm_redis: str | None = None, stream_url: str | None = None
) -> Iterator[list[Target]]:
    """The four targets (five with ``litellm_redis``, a Redis URL for a second LiteLLM),
    every server up and answering; all stopped on exit. LiteLLM's output goes to
    ``out``/litellm*.log; ``stream_url`` is the long streams' fake model."""
    with ExitStack() as stack:
        env, tokens, upstream_url = stack.enter_context(environment(stack))
        found = [Target(DIRECT, upstream_url, "chat/completions", [], None)]
        port = spare_port()
        pid, url = stack.enter_context(server(commands(port, 0)["sync"], env, port))
        found.append(Target(SYNC, url, PATH, tokens, pid))
        port = spare_port()
        pid, url = stack.enter_context(server(commands(0, port)["async"], env, port))
        found.append(Target(ASYNC, url, PATH, tokens, pid))
        keys = [f"sk-bench-{n}" for n in range(len(tokens))]
        peers = [(LITELLM, None, "litellm.log")]
        if litellm_redis:
            peers.append((LITELLM_REDIS, litellm_redis, "litellm-redis.log"))
        for name, redis_url, log in peers:
            port = spare_port()
            output = stack.enter_context(open(out / log, "w"))
            command = litellm_command(port)
            peer_env = litellm_env(upstream_url, stream_url, redis_url)
            # LiteLLM imports for 30-300 s on this shared VM before it binds its port, and
            # two starting at once on 2 cores take longer still: one at a time.
            pid, url = stack.enter_context(server(command, peer_env, port, output, timeout=600))
            found.append(Target(name, url, PATH, keys, pid))
            wait_until_answers(found[-1], timeout=600)
        for target in found:
            wait_until_answers(target)
        yield found


# --- short requests ------------------------------------------------------------------


def _streamed(bodies: list[dict]) -> list[dict]:
    return [{**body, "stream": True, "stream_options": {"include_usage": True}} for body in bodies]


def short_requests(found: list[Target], sizes: Sizes) -> dict[str, dict[str, Figures]]:
    plain = _bodies(sizes.per_round, MODEL)
    bodies = {"plain": plain, "stream": _streamed(plain)}
    figures = {target.name: {kind: Figures() for kind in KINDS} for target in found}
    for target in found:  # warm every worker and connection pool
        for kind in KINDS:
            fire(target.url, target.path, target.tokens, bodies[kind][:64], CONCURRENCY)
    for n in range(sizes.rounds):
        order = found[n % len(found) :] + found[: n % len(found)]
        for target in order:
            for kind in KINDS:
                fig = figures[target.name][kind]
                with httpx.Client(base_url=target.url, timeout=60) as client:
                    fig.one += sequential(
                        client, target.tokens, bodies[kind][: sizes.sequential], target.path
                    )
                before = cpu_seconds(target.pid) if target.pid else 0.0
                rate, latencies = fire(
                    target.url, target.path, target.tokens, bodies[kind], CONCURRENCY
                )
                if target.pid:
                    fig.cpu.append((cpu_seconds(target.pid) - before) / len(bodies[kind]))
                fig.rates.append(rate)
                fig.many += latencies
        print(f"  round {n + 1}/{sizes.rounds}: " + "; ".join(
            f"{name} {fig['plain'].rates[-1]:.0f}/{fig['stream'].rates[-1]:.0f} req/s"
            for name, fig in figures.items()), flush=True)  # fmt: skip
    return figures


# --- long streams --------------------------------------------------------------------


def _peer(target: Target, keys: Path) -> long_streams.Serve:
    """A LiteLLM already running (``targets``) as a long-stream path: nothing started
    or stopped per phase; its keys instead of our users' tokens, no ledger, no lag."""

    @contextmanager
    def serve(run: long_streams.Run, count: int) -> Iterator[long_streams.Served]:
        yield long_streams.Served(f"{target.url}/v1", target.pid, keys)

    return serve


def long_section(found: list[Target], streams: long_streams.Run) -> list[dict[str, Any]]:
    """Section 11's phases through every target, for each N: direct first, then the
    others in an order rotated from one N to the next; a row (``long_streams.figures``)
    per phase."""
    keys = streams.scratch / "litellm-keys"
    keys.write_text("\n".join(f"sk-bench-{n}" for n in range(long_streams.USERS)))
    ours = {SYNC: long_streams.ours("sync"), ASYNC: long_streams.ours("async")}
    paths = [(t.name, ours.get(t.name) or _peer(t, keys)) for t in found if t.name != DIRECT]
    options, rows = streams.options, []
    for n, count in enumerate(options.counts):
        base = long_streams.measure(streams, DIRECT, long_streams.direct, count)
        rows.append(long_streams.figures(base, base))
        for name, serve in paths[n % len(paths) :] + paths[: n % len(paths)]:
            if name == SYNC and count not in options.sync_counts:
                continue
            phase = long_streams.measure(streams, name, serve, count)
            rows.append(long_streams.figures(phase, base))
    return rows


# --- the run and its report ----------------------------------------------------------


@dataclass
class Report:
    started: str
    machine: str
    versions: dict[str, str]
    load: list[tuple[float, float, float]]  # at the start, after the short part, at the end
    sizes: Sizes
    short: dict[str, dict[str, Figures]] = field(default_factory=dict)
    long: list[dict[str, Any]] = field(default_factory=list)  # long_streams.figures rows


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info
                         if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, Linux {platform.release()}"


def versions() -> dict[str, str]:
    import importlib.metadata as meta

    from django_redis import get_redis_connection

    names = ("django", "djangorestframework", "gunicorn", "uvicorn", "uvloop", "httpx")
    found = {name: meta.version(name) for name in names}
    found["python"] = platform.python_version()
    found["redis-server"] = get_redis_connection("default").info("server")["redis_version"]
    found["litellm"] = litellm_version()
    return found


def run(sizes: Sizes, *, long: bool = True, out: Path, plot: Path | None,
        litellm_redis: str | None = None) -> Report:  # fmt: skip
    """Measure every target and write ``out``/results.{md,json} and the plots (``plot``
    and, with the long streams, ``streams_plot(plot)``)."""
    report = Report(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine(), versions(),
                    [os.getloadavg()], sizes)  # fmt: skip
    print(f"peers bench, {report.started}; {report.machine}", flush=True)
    print("  " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        # The long streams' fake model first: the LiteLLM started next routes to it.
        streams = stack.enter_context(long_streams.prepared(sizes.streams())) if long else None
        stream_url = streams.upstream_url if streams else None
        found = stack.enter_context(targets(out, litellm_redis, stream_url))
        print(f"  all {len(found)} answer; load average {_load(os.getloadavg())}", flush=True)
        report.short = short_requests(found, sizes)
        report.load.append(os.getloadavg())
        if streams is not None:
            report.long = long_section(found, streams)
    report.load.append(os.getloadavg())
    text = markdown(report)
    print("\n" + text, flush=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(asdict(report), indent=1))
    if plot is not None:
        from tests.benchmarks.peers.plot import streams_svg, svg

        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_text(svg(summary(report), report.started, report.versions["litellm"]))
        print(f"plot: {plot}", flush=True)
        if report.long:
            caption = f"{_streams_caption(sizes)}, {report.started}"
            streams_plot(plot).write_text(
                streams_svg(report.long, caption, report.versions["litellm"])
            )
            print(f"plot: {streams_plot(plot)}", flush=True)
    return report


def streams_plot(plot: Path) -> Path:
    """The long streams' figure, beside the short requests' (``peers-streams.svg``)."""
    return plot.with_name(f"{plot.stem}-streams{plot.suffix}")


def _streams_caption(sizes: Sizes) -> str:
    return (f"{sizes.length:g} s streams, a chunk every {sizes.interval * 1e3:.0f} ms, "
            f"opened over {sizes.ramp:g} s")  # fmt: skip


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def summary(report: Report) -> dict[str, dict[str, float]]:
    """Per target, the figures the table and the plot show (ms, req/s)."""
    direct = {kind: _p(sorted(report.short[DIRECT][kind].one), 0.5) for kind in KINDS}
    rows: dict[str, dict[str, float]] = {}
    for name, figures in report.short.items():
        row: dict[str, float] = {}
        for kind in KINDS:
            fig = figures[kind]
            one = sorted(fig.one)
            row[f"{kind} added p50"] = (_p(one, 0.5) - direct[kind]) * 1e3
            row[f"{kind} p50"] = _p(one, 0.5) * 1e3
            row[f"{kind} p99"] = _p(one, 0.99) * 1e3
            row[f"{kind} req/s"] = statistics.median(fig.rates)
            if fig.cpu:
                row[f"{kind} cpu"] = statistics.median(fig.cpu) * 1e3
        rows[name] = row
    return rows


def markdown(report: Report) -> str:
    rows = summary(report)
    sizes = report.sizes
    lines = [
        f"Run {report.started}; {report.machine}; load average (1/5/15 min) "
        + "; ".join(_load(load) for load in report.load)
        + " (start; after the short "
        "requests; end). " + ", ".join(f"{k} {v}" for k, v in report.versions.items()) + ".",
        "",
        f"{sizes.rounds} rounds, each target in turn (rotated): {sizes.sequential} calls one "
        f"at a time, then {sizes.per_round} at {CONCURRENCY} at once, non-streamed and "
        "streamed. Added = p50 less the direct p50 of this run.",
        "",
        "| path | added p50 / p99, non-streamed | added p50 / p99, streamed "
        f"| req/s at {CONCURRENCY}, non-streamed / streamed "
        "| gateway CPU per request, non-streamed / streamed |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        cpu = (f"{row['plain cpu']:.2f} / {row['stream cpu']:.2f} ms"
               if "plain cpu" in row else "(no gateway)")  # fmt: skip
        lines.append(
            f"| {name} | +{row['plain added p50']:.2f} / {row['plain p99']:.1f} ms "
            f"| +{row['stream added p50']:.2f} / {row['stream p99']:.1f} ms "
            f"| {row['plain req/s']:.0f} / {row['stream req/s']:.0f} | {cpu} |"
        )
    if report.long:
        lines += [
            "",
            f"Long streams (section 11's method): N at once, {_streams_caption(sizes)}; "
            "for each N direct first, then the others in turn (ours started afresh per "
            "phase, LiteLLM the one above). Added = over direct at the same N.",
            "",
            long_streams.markdown(report.long),
        ]
    return "\n".join(lines)
