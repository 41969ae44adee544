"""Views the many-processes tests call: a tier read, a gated call (sync and async)."""

from __future__ import annotations

import asyncio
import os
import time

from asgiref.sync import iscoroutinefunction
from django.http import JsonResponse
from django.urls import resolve
from django.views.decorators.csrf import csrf_exempt

from llm_quota import quota_guard
from llm_quota.exceptions import QuotaExceeded
from llm_quota.rules.config_cache import config_cache
from llm_quota.rules.policy import policy_for

#: Every gated call: a 100-token prompt, 50 output tokens at 4 base tokens each = 300.
PROMPT, OUTPUT = 100, 50


def policy(request, pk):
    time.sleep(float(request.GET.get("hold", 0)))  # keep this worker busy: spread the load
    limits = policy_for(pk).limits
    return JsonResponse(
        {
            "pid": os.getpid(),
            "requests_per_minute": limits.requests_per_minute,
            "generation": config_cache.generation,
        }
    )


@csrf_exempt
def call(request, pk):
    try:
        with quota_guard(pk, model="gpt-4o", prompt_tokens=PROMPT, max_tokens=OUTPUT) as q:
            time.sleep(0.02)  # the upstream call
            q.settle({"prompt_tokens": PROMPT, "completion_tokens": q.max_tokens})
    except QuotaExceeded as exc:
        return JsonResponse({"pid": os.getpid(), "limit": exc.limit}, status=429)
    return JsonResponse({"pid": os.getpid(), "reserved": q.reservation.reserved})


def _cpu_wait() -> float:
    """Seconds this thread has spent ready to run but waiting for a CPU (Linux
    schedstat), or 0 where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _Heartbeat:
    """Ticks on this worker's event loop; its largest gap shows any blocking.

    ``max_gap`` is wall-clock time. ``max_stall`` leaves out the time the loop's thread
    was ready but other processes had the CPUs (a busy shared machine): what remains
    is this process' own doing, a blocking call, a long callback, or a thread of its
    own holding the GIL.
    """

    every = 0.002

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.max_stall = 0.0
        self.task = None

    async def beat(self) -> None:
        last, waited = time.perf_counter(), _cpu_wait()
        while True:
            await asyncio.sleep(self.every)
            now, now_waited = time.perf_counter(), _cpu_wait()
            gap = now - last - self.every
            self.max_gap = max(self.max_gap, gap)
            self.max_stall = max(self.max_stall, gap - (now_waited - waited))
            last, waited = now, now_waited

    def reset(self) -> None:
        self.max_gap = self.max_stall = 0.0

    def ensure(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.beat())


heartbeat = _Heartbeat()


@csrf_exempt
async def acall(request, pk):
    heartbeat.ensure()
    try:
        async with quota_guard(pk, model="gpt-4o", prompt_tokens=PROMPT, max_tokens=OUTPUT) as q:
            await asyncio.sleep(0.05)  # the upstream call
            await q.asettle({"prompt_tokens": PROMPT, "completion_tokens": q.max_tokens})
    except QuotaExceeded as exc:
        return JsonResponse({"pid": os.getpid(), "limit": exc.limit}, status=429)
    return JsonResponse({"pid": os.getpid(), "reserved": q.reservation.reserved})


async def beat(request):
    """This worker's largest loop gap so far; ``?reset=1`` starts counting afresh."""
    heartbeat.ensure()
    await asyncio.sleep(0.01)
    answer = {
        "pid": os.getpid(),
        "max_gap": heartbeat.max_gap,
        "max_stall": heartbeat.max_stall,
        # Which chat view the URLs route to: the async one under project/asgi.py.
        "async_gateway": iscoroutinefunction(resolve("/v1/chat/completions").func),
    }
    if request.GET.get("reset"):
        heartbeat.reset()
    return JsonResponse(answer)
