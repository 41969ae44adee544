"""The ASGI handler alone, lean and not: ``python -m tests.benchmarks.asgi_hops``.

One process, ``ThreadedASGIHandler`` serving an async view that has no sync code (what a
warm gateway request is to the handler) through asgiref's ``ApplicationCommunicator``,
no server and no socket: what is left is the handler's own work. The same handler
object is served with its lean path (``handle_lean``) and without it (``pinned`` off:
Django's ``handle``, its two hops to the request's thread), in alternating rounds
(ABBA), so a load change on a shared machine hits both alike. Per round: the process's
CPU (``time.process_time``, every thread's) and wall time per request, and the calls
submitted to the request's thread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.gateway_settings")

import django  # noqa: E402

django.setup()

from asgiref.testing import ApplicationCommunicator  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.test.utils import override_settings  # noqa: E402
from django.urls import path  # noqa: E402

from llm_quota.gateway.asgi import RequestThread, ThreadedASGIHandler  # noqa: E402


async def no_sync_code(request):
    return JsonResponse({"ok": True})


urlpatterns = [path("v1/ok", no_sync_code)]

SCOPE = {
    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
    "scheme": "http", "path": "/v1/ok", "raw_path": b"/v1/ok", "root_path": "",
    "query_string": b"", "headers": [], "client": ("127.0.0.1", 50000),
    "server": ("testserver", 80),
}  # fmt: skip


async def _serve(app: ThreadedASGIHandler, requests: int) -> None:
    for _ in range(requests):
        client = ApplicationCommunicator(app, dict(SCOPE))
        await client.send_input({"type": "http.request", "body": b""})
        await client.receive_output(10)
        await client.receive_output(10)
        await client.wait(10)


def _round(app: ThreadedASGIHandler, requests: int) -> tuple[float, float, int]:
    """(CPU s, wall s, submits) per request."""
    submitted = RequestThread.submit
    count = [0]

    def counted(self, fn, /, *args, **kwargs):
        count[0] += 1
        return submitted(self, fn, *args, **kwargs)

    RequestThread.submit = counted  # type: ignore[method-assign]
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        asyncio.run(_serve(app, requests))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        RequestThread.submit = submitted  # type: ignore[method-assign]
    return cpu / requests, wall / requests, count[0] // requests


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.asgi_hops")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per path (ABBA)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    args = parser.parse_args(argv)
    with override_settings(ROOT_URLCONF=__name__):
        app = ThreadedASGIHandler()
        pinned = app.pinned
        assert pinned, "ASGIHandler.handle is not the pinned one: nothing to compare"
        _round(app, 200)  # warm: the pooled thread, the URL resolver
        figures: dict[str, list[tuple[float, float, int]]] = {"django": [], "lean": []}
        for n in range(args.rounds * 2):
            name = ("django", "lean")[(n + n // 2) % 2]
            app.pinned = name == "lean"
            figures[name].append(_round(app, args.requests))
            cpu, wall, submits = figures[name][-1]
            print(f"  round {n + 1}/{args.rounds * 2} ({name}): {cpu * 1e6:.0f} µs CPU, "
                  f"{wall * 1e6:.0f} µs wall, {submits} submits a request", flush=True)  # fmt: skip
    for name, rounds in figures.items():
        cpu = [c for c, _w, _s in rounds]
        wall = [w for _c, w, _s in rounds]
        print(f"{name}: CPU per request {statistics.median(cpu) * 1e6:.0f} µs "
              f"({min(cpu) * 1e6:.0f} to {max(cpu) * 1e6:.0f}), wall "
              f"{statistics.median(wall) * 1e6:.0f} µs, {rounds[0][2]} submits")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
