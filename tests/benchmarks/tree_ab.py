"""Section 10's rows for two trees in one run: ``python -m tests.benchmarks.tree_ab REV``.

A change to the gateway is measured against the tree before it, side by side, so a load
change on a shared machine hits both alike. ``REV`` (a commit) is copied out with
``git archive``; the other tree is this working tree. Both are served at once by
gunicorn 2 workers x 8 threads (section 10's command, each from its own tree) on one
Redis, one database (seeded once) and one stdlib fake upstream. Rounds go in ABBA
order (before, after, after, before, ...). ``--servers sync,async,async-gateway``
serves the async rows too, each tree's: uvicorn 2 workers (section 10's command, the
tree first on ``sys.path`` by ``--app-dir``) on the demo's settings, and on
``project.gateway_settings``; every server of a tree is measured in its round. Per round,
server and tree, non-streamed then streamed (``stream_options.include_usage``):

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
SERVERS = ("sync", "async", "async-gateway")


def command(kind: str, tree: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """Section 10's command for server ``kind`` from ``tree``, and its settings."""
    if kind == "sync":
        # gunicorn's --chdir puts the tree first on the workers' sys.path.
        return [*commands(port, 0)["sync"], "--chdir", str(tree)], {}
    settings = "project.gateway_settings" if kind == "async-gateway" else "project.settings"
    return [*commands(0, port)["async"], "--app-dir", str(tree)], {
        "DJANGO_SETTINGS_MODULE": settings
    }


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
    parser.add_argument("--servers", default="sync", help=f"of {','.join(SERVERS)}")
    args = parser.parse_args(argv)
    kinds = args.servers.split(",")
    assert set(kinds) <= set(SERVERS), args.servers
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
            for kind in kinds:
                port = spare_port()
                argv_, extra = command(kind, tree, port)
                # Run in the tree: uvicorn's spawned workers put their working directory
                # ahead of --app-dir on sys.path, so from ROOT they imported this tree's
                # llm_quota whatever --app-dir said.
                servers[kind, name] = stack.enter_context(
                    server(argv_, {**env, **extra}, port, cwd=tree)
                )
        for _pid, url in servers.values():  # warm both workers and their pools
            for kind in KINDS:
                fire(url, PATH, tokens, bodies[kind][:200], CONCURRENCY)
        rows = [(row, name, kind) for row in kinds for name in trees for kind in KINDS]
        one: dict[tuple, list[float]] = {row: [] for row in rows}
        cpu: dict[tuple, list[float]] = {row: [] for row in rows}
        rate: dict[tuple, list[float]] = {row: [] for row in rows}
        order = ["before", "after"]
        for n in range(args.rounds * 2):
            name = order[(n + n // 2) % 2]  # ABBA: before, after, after, before
            for row in kinds:
                pid, url = servers[row, name]
                for kind in KINDS:
                    with httpx.Client(base_url=upstream_url, timeout=60) as client:
                        here = sequential(client, [], bodies[kind][: args.sequential], UPSTREAM)
                    with httpx.Client(base_url=url, timeout=60) as client:
                        seq = sequential(client, tokens, bodies[kind][: args.sequential], PATH)
                    one[row, name, kind].append(_p(sorted(seq), 0.5) - _p(sorted(here), 0.5))
                    before = cpu_seconds(pid)
                    per_second, _latencies = fire(url, PATH, tokens, bodies[kind], CONCURRENCY)
                    cpu[row, name, kind].append((cpu_seconds(pid) - before) / len(bodies[kind]))
                    rate[row, name, kind].append(per_second)
                print(f"  round {n + 1}/{args.rounds * 2} ({row}, {name}): " + "; ".join(
                    f"{kind} {cpu[row, name, kind][-1] * 1e3:.2f} ms CPU, "
                    f"{one[row, name, kind][-1] * 1e3:+.2f} ms p50, "
                    f"{rate[row, name, kind][-1]:.0f}/s"
                    for kind in KINDS), flush=True)  # fmt: skip
    print(report(args.before, cpu, one, rate))
    return 0


def _ms(values: list[float], sign: str = "") -> str:
    """The median and range of per-round figures, in milliseconds (``sign="+"``: signed)."""
    return (f"{statistics.median(values) * 1e3:{sign}.2f} ms "
            f"({min(values) * 1e3:{sign}.2f} to {max(values) * 1e3:{sign}.2f})")  # fmt: skip


def report(rev: str, cpu: dict, one: dict, rate: dict) -> str:
    """A markdown table: per server and kind, each tree's medians, then after against
    before."""
    lines = [f"\n| server | tree ({rev} → working tree) | kind | CPU per request (rounds) | "
             "added p50 (rounds) | req/s at 16 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in dict.fromkeys(key[0] for key in cpu):
        for kind in KINDS:
            for name in ("before", "after"):
                per_second = statistics.median(rate[row, name, kind])
                lines.append(f"| {row} | {name} | {kind} | {_ms(cpu[row, name, kind])} | "
                             f"{_ms(one[row, name, kind], '+')} | {per_second:.0f} |")  # fmt: skip
            after, before = cpu[row, "after", kind], cpu[row, "before", kind]
            ratio = statistics.median(after) / statistics.median(before)
            added = statistics.median(one[row, "after", kind]) - statistics.median(
                one[row, "before", kind]
            )
            lines.append(f"| {row} | after / before | {kind} | {ratio - 1:+.1%} | "
                         f"{added * 1e3:+.2f} ms | |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
