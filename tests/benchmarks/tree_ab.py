"""Section 10's sync row for two trees in one run: ``python -m tests.benchmarks.tree_ab REV``.

A change to the gateway is measured against the tree before it, side by side, so a load
change on a shared machine hits both alike. ``REV`` (a commit) is copied out with
``git archive``; the other tree is this working tree. Both are served at once by
gunicorn 2 workers x 8 threads (section 10's command, each from its own tree) on one
Redis, one database (seeded once) and one stdlib fake upstream. Rounds go in ABBA
order (before, after, after, before, ...). Per round and tree, non-streamed then
streamed (``stream_options.include_usage``):

- **one at a time**: sequential calls on one keep-alive connection, the added p50 over
  the upstream called directly in the same round;
- **16 at once**: the gateway's CPU per request (``/proc``, as section 10) and req/s.

Both trees must share the database schema (no migration between them).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx

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

KINDS = ("plain", "stream")
UPSTREAM = "chat/completions"


def archive(rev: str, into: Path) -> Path:
    """A copy of ``rev``'s tree in ``into`` (``git archive``, so nothing uncommitted)."""
    tar = into / "tree.tar"
    with open(tar, "wb") as out:
        subprocess.run(["git", "archive", rev], cwd=ROOT, stdout=out, check=True)
    tree = into / "tree"
    with tarfile.open(tar) as archived:
        archived.extractall(tree, filter="data")
    return tree


def _streamed(bodies: list[dict]) -> list[dict]:
    return [{**body, "stream": True, "stream_options": {"include_usage": True}} for body in bodies]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.tree_ab")
    parser.add_argument("before", help="the commit to compare this working tree against")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per tree (ABBA)")
    parser.add_argument("--sequential", type=int, default=150, help="calls one at a time")
    parser.add_argument("--per-round", type=int, default=600, help="calls at 16 at once")
    args = parser.parse_args(argv)
    from tests.benchmarks.__main__ import setup

    setup()
    plain = _bodies(args.per_round, MODEL)
    bodies = {"plain": plain, "stream": _streamed(plain)}
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmq-ab-")))
        trees = {"before": archive(args.before, scratch), "after": ROOT}
        env, tokens, upstream_url = stack.enter_context(environment(stack))
        servers = {}
        for name, tree in trees.items():
            port = spare_port()
            # gunicorn's --chdir puts the tree first on the workers' sys.path.
            command = [*commands(port, 0)["sync"], "--chdir", str(tree)]
            servers[name] = stack.enter_context(server(command, env, port))
        for _pid, url in servers.values():  # warm both workers and their pools
            for kind in KINDS:
                fire(url, PATH, tokens, bodies[kind][:200], CONCURRENCY)
        one = {(name, kind): [] for name in trees for kind in KINDS}
        cpu = {(name, kind): [] for name in trees for kind in KINDS}
        rate = {(name, kind): [] for name in trees for kind in KINDS}
        direct: dict[str, list[float]] = {kind: [] for kind in KINDS}
        order = ["before", "after"]
        for n in range(args.rounds * 2):
            name = order[(n + n // 2) % 2]  # ABBA: before, after, after, before
            pid, url = servers[name]
            for kind in KINDS:
                with httpx.Client(base_url=upstream_url, timeout=60) as client:
                    here = sequential(client, [], bodies[kind][: args.sequential], UPSTREAM)
                with httpx.Client(base_url=url, timeout=60) as client:
                    seq = sequential(client, tokens, bodies[kind][: args.sequential], PATH)
                direct[kind] += here
                one[name, kind].append(_p(sorted(seq), 0.5) - _p(sorted(here), 0.5))
                before = cpu_seconds(pid)
                per_second, _latencies = fire(url, PATH, tokens, bodies[kind], CONCURRENCY)
                cpu[name, kind].append((cpu_seconds(pid) - before) / len(bodies[kind]))
                rate[name, kind].append(per_second)
            print(f"  round {n + 1}/{args.rounds * 2} ({name}): " + "; ".join(
                f"{kind} {cpu[name, kind][-1] * 1e3:.2f} ms CPU, "
                f"{one[name, kind][-1] * 1e3:+.2f} ms p50, {rate[name, kind][-1]:.0f}/s"
                for kind in KINDS), flush=True)  # fmt: skip
    print(report(args.before, cpu, one, rate))
    return 0


def _ms(values: list[float], sign: str = "") -> str:
    """The median and range of per-round figures, in milliseconds (``sign="+"``: signed)."""
    return (f"{statistics.median(values) * 1e3:{sign}.2f} ms "
            f"({min(values) * 1e3:{sign}.2f} to {max(values) * 1e3:{sign}.2f})")  # fmt: skip


def report(rev: str, cpu: dict, one: dict, rate: dict) -> str:
    """A markdown table: per kind, each tree's medians, then after against before."""
    lines = [f"\n| tree ({rev} → working tree) | kind | CPU per request (rounds) | "
             "added p50 (rounds) | req/s at 16 |", "|---|---|---|---|---|"]  # fmt: skip
    for kind in KINDS:
        for name in ("before", "after"):
            per_second = statistics.median(rate[name, kind])
            lines.append(f"| {name} | {kind} | {_ms(cpu[name, kind])} | "
                         f"{_ms(one[name, kind], '+')} | {per_second:.0f} |")  # fmt: skip
        cpu_ratio = statistics.median(cpu["after", kind]) / statistics.median(cpu["before", kind])
        added = statistics.median(one["after", kind]) - statistics.median(one["before", kind])
        lines.append(f"| after / before | {kind} | {cpu_ratio - 1:+.1%} | "
                     f"{added * 1e3:+.2f} ms | |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
