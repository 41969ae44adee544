"""The demo's ASGI application with an event-loop lag sampler beside it (bench-only).

The long-stream section serves this under uvicorn instead of ``project.asgi``: the same
application, plus one task per worker that sleeps ``INTERVAL`` and notes how late it
woke. Lateness is the time callbacks ready to run waited behind others: what every
stream on the worker waits too, for its next chunk or its first. Each worker appends
``<monotonic time> <lag ms>`` lines to ``$LLMQ_BENCH_LAG_DIR/<pid>`` about once a
second (CLOCK_MONOTONIC is the machine's, so the bench cuts out each phase's window).
A 500's traceback goes to the terminal. ``LLMQ_BENCH_GC=unfrozen`` undoes ``warm_up``'s
``gc.freeze()``: the before, for the long-stream section's ``--variant unfrozen``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any

from project.asgi import application as django_application

if os.environ.get("LLMQ_BENCH_GC") == "unfrozen":
    gc.unfreeze()

INTERVAL = 0.05

# With DEBUG off Django logs a 500's traceback only to ``mail_admins``: the bench
# wants it on the terminal, to say what failed.
logging.getLogger("django.request").addHandler(logging.StreamHandler())
_sampler: asyncio.Task[None] | None = None


async def _sample(path: str) -> None:
    lines: list[str] = []
    while True:
        start = time.perf_counter()
        await asyncio.sleep(INTERVAL)
        lag = time.perf_counter() - start - INTERVAL
        lines.append(f"{time.monotonic():.3f} {lag * 1e3:.2f}\n")
        if len(lines) >= 20:
            with open(path, "a") as out:
                out.writelines(lines)
            lines.clear()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _sampler
    if _sampler is None and os.environ.get("LLMQ_BENCH_LAG_DIR"):
        path = os.path.join(os.environ["LLMQ_BENCH_LAG_DIR"], str(os.getpid()))
        _sampler = asyncio.get_running_loop().create_task(_sample(path))
    await django_application(scope, receive, send)
