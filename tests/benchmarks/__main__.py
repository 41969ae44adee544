"""``python -m tests.benchmarks [section ...]``: run the benchmark table."""

from __future__ import annotations

import os
import platform
import signal
import sys
import tempfile
import time


def _exit(signum: int, _frame: object) -> None:
    sys.exit(128 + signum)


def setup() -> None:
    """Django set up as the benchmarks run it (also by ``tests.benchmarks.peers``).

    SIGTERM (``kill``, ``timeout``) then stops a bench as an exception does: every
    server, client process and scratch file it started is stopped or removed on the way
    out. Without this the process would die at once, leaving its servers running: they
    run in sessions of their own, out of reach of a signal to its process group."""
    signal.signal(signal.SIGTERM, _exit)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    # Sections 4 and 7 need users and snapshots: a scratch database unless one is given.
    scratch = tempfile.mkdtemp(prefix="llmq-bench-")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{scratch}/bench.sqlite3")
    # As deployed: DEBUG's query log would time Django's SQL bookkeeping, not ours.
    os.environ.setdefault("DJANGO_DEBUG", "0")
    import django

    django.setup()


def main(argv: list[str]) -> int:
    setup()
    from django.conf import settings
    from django_redis import get_redis_connection

    from tests.benchmarks import (
        async_gateway,
        burst,
        end_to_end,
        estimation_cost,
        gate_cost,
        key_cost,
        long_streams,
        memory,
        scale_out,
        snapshot_time,
        throughput,
    )
    from tests.benchmarks.measure import Table

    sections = {
        "cost": gate_cost.run,
        "keys": key_cost.run,
        "burst": burst.run,
        "e2e": end_to_end.run,
        "throughput": throughput.run,
        "estimation": estimation_cost.run,
        "snapshot": snapshot_time.run,
        "memory": memory.run,
        "scale": scale_out.run,
        "async": async_gateway.run,
        "streams": long_streams.run,
    }
    chosen = argv or list(sections)
    info = get_redis_connection("default").info("server")
    print(f"django-llm-quota benchmarks, {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, Redis {info['redis_version']} at "
        f"{settings.REDIS_URL.split('@')[-1]}"
    )
    table = Table()
    started = time.perf_counter()
    for number, name in enumerate(chosen, 1):
        elapsed = time.perf_counter() - started
        print(f"\n[{name}] ({number}/{len(chosen)}, {elapsed:.0f} s so far)", flush=True)
        sections[name](table)
    print(f"\n{table.markdown()}\n\nfinished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
