"""``python -m tests.benchmarks.journal_window [directory]``: what a journal entry
costs and how long it waits for ``fsync`` (docs: reliability, "Durability window").

Appends entries at a steady 140 a second through ``JournalFile`` with its default
batched fsync, and times, for each entry, the append (what a settle pays) and the wait
until an fsync that covers it has returned (what a crash of the whole host may lose).
A killed process loses nothing once the append returned: the page cache outlives it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time

from llm_quota.ledger.journal_file import JournalFile
from llm_quota.ledger.replies import Reservation
from llm_quota.rules.accounting import ActualUsage, Estimate, Price

ENTRIES, PAUSE, INTERVAL = 700, 0.007, 0.05


def entry(n: int) -> Reservation:
    price = Price("gpt-4o", 1_000_000, 4_000_000)
    return Reservation(f"r{n}", "7", "gpt-4o", 90, 20, Estimate(price, 10, 20),
                       "2026-12-03", "2026-12", 1_798_761_600_000, False)  # fmt: skip


class Timed(JournalFile):
    """Notes when each fsync that returned began: entries written before it are safe."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory, INTERVAL)
        self.synced: list[tuple[float, float]] = []
        self.guard = threading.Lock()

    def sync(self) -> None:
        began = time.perf_counter()
        super().sync()
        with self.guard:
            self.synced.append((began, time.perf_counter()))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def main(directory: str) -> None:
    scratch = tempfile.mkdtemp(prefix="llmq-journal-", dir=directory)
    journal = Timed(scratch)
    usage = ActualUsage(10, 5)
    written, appends = [], []
    for n in range(ENTRIES):
        start = time.perf_counter()
        journal.append(entry(n), usage)
        done = time.perf_counter()
        written.append(done)
        appends.append(done - start)
        time.sleep(PAUSE)
    time.sleep(INTERVAL * 4)
    journal.close()
    shutil.rmtree(scratch)
    fsyncs = [end - began for began, end in journal.synced]
    waits = []
    for at in written:
        covering = [end for began, end in journal.synced if began >= at]
        waits.append(min(covering) - at)
    ms = 1000
    print(f"directory {directory}, {ENTRIES} entries, fsync at most every {INTERVAL * ms:.0f} ms")
    print(f"append       p50 {percentile(appends, .5) * ms:6.3f} ms  p99 "
          f"{percentile(appends, .99) * ms:6.3f} ms")  # fmt: skip
    print(f"fsync        p50 {percentile(fsyncs, .5) * ms:6.2f} ms  p99 "
          f"{percentile(fsyncs, .99) * ms:6.2f} ms  ({len(fsyncs)} calls)")  # fmt: skip
    print(f"unsynced for p50 {percentile(waits, .5) * ms:6.1f} ms  p99 "
          f"{percentile(waits, .99) * ms:6.1f} ms  max {max(waits) * ms:6.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.getcwd())
