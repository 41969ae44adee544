"""The async upstream client's CPU per call, httpx against aiohttp, in one process:
``python -m tests.benchmarks.async_client [--calls N] [--rounds N]``.

``HttpUpstream.acomplete`` and a 40-event ``astream`` (read to its end, then closed)
against the stdlib fake upstream run in another process (``up-normal``), so that only
the client's work is counted: this process's CPU time (``time.process_time``) over the
calls, on uvloop as the uvicorn workers run. One ``HttpUpstream`` per client, each on
its own kept-alive connection; rounds go in ABBA order (httpx, aiohttp, aiohttp,
httpx...), so a load change on a shared machine hits both alike. The gateway itself
(admission, settle, Django) is not in it: section 10 measures that.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

from tests.loadtest.harness import ROOT

BODY = {"model": "up-normal", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
STREAM = {**BODY, "stream": True}
#: The fake upstream, in a process of its own: it prints its URL once it listens.
SERVE = (
    "import time, tests.support.fake_upstream as f; s = f.UpstreamServer().start(); "
    "print(s.url, flush=True); time.sleep(10**6)"
)


def _upstream(url: str, client: str) -> Any:
    from llm_quota.gateway.upstream import HttpUpstream

    upstream = HttpUpstream(url, "bench", connect_timeout=5, read_timeout=30)
    if client == "httpx":
        upstream._async_sender = False  # as where aiohttp is not installed
    return upstream


async def _calls(upstream: Any, kind: str, calls: int) -> float:
    """CPU seconds per call of ``calls`` calls of ``kind``."""
    began = time.process_time()
    for _ in range(calls):
        if kind == "complete":
            await upstream.acomplete(BODY)
        else:
            stream = await upstream.astream(STREAM)
            events = [data async for data in stream]
            await stream.aclose()
            assert len(events) >= 40, len(events)
    return (time.process_time() - began) / calls


async def _run(url: str, calls: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    upstreams = {client: _upstream(url, client) for client in ("httpx", "aiohttp")}
    found: dict[tuple[str, str], list[float]] = {}
    for upstream in upstreams.values():  # warm: imports, the kept-alive connections
        for kind in ("complete", "stream"):
            await _calls(upstream, kind, 50)
    order = ["httpx", "aiohttp"]
    for n in range(rounds * 2):
        client = order[(n + n // 2) % 2]
        for kind in ("complete", "stream"):
            cost = await _calls(upstreams[client], kind, calls)
            found.setdefault((client, kind), []).append(cost)
            print(f"  {n + 1}/{rounds * 2} {client} {kind}: {cost * 1e6:.0f} µs", flush=True)
    await (await upstreams["httpx"].aclient()).aclose()
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.async_client")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client (ABBA)")
    args = parser.parse_args(argv)
    import uvloop

    from tests.benchmarks.__main__ import setup

    setup()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        url = server.stdout.readline().strip() if server.stdout else ""
        found = uvloop.run(_run(url, args.calls, args.rounds))
    finally:
        server.terminate()
        server.wait(10)
    print("\n| client | CPU per acomplete (rounds) | per 40-event astream (rounds) |")
    print("|---|---|---|")
    for client in ("httpx", "aiohttp"):
        cells = [found[client, kind] for kind in ("complete", "stream")]
        print(f"| {client} | " + " | ".join(
            f"{statistics.median(c) * 1e6:.0f} µs ({min(c) * 1e6:.0f}-{max(c) * 1e6:.0f})"
            for c in cells) + " |")  # fmt: skip
    for kind in ("complete", "stream"):
        ratio = statistics.median(found["aiohttp", kind]) / statistics.median(found["httpx", kind])
        print(f"aiohttp / httpx, {kind}: {ratio - 1:+.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
