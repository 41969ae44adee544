"""One daemon thread per process, started on demand and again after a fork.

The pub/sub listeners of the ledger (``config_broadcast``'s config listener,
``sentinel_watch``'s failover watcher) each need a thread in every process that uses
them: a gunicorn worker, a uvicorn worker, a Celery worker. Threads do not survive the
fork of a preloading gunicorn or a prefork Celery pool, so ``ensure_running`` is called
on a hot path (it costs a pid comparison) and starts the thread in a process that has
none; it never raises into the request that called it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable

#: Seconds between PINGs on an idle subscription, so a silently dead socket is noticed.
PING_EVERY = 15.0
#: Seconds to wait before the n-th reconnection in a row (the last one repeats).
RECONNECT_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)


def backoff(failures: int) -> float:
    """How long to wait after ``failures`` failed connections in a row."""
    return RECONNECT_BACKOFF[min(failures, len(RECONNECT_BACKOFF) - 1)]


class ProcessThread:
    """Subclasses give ``name`` and ``prepare``; ``key`` (a channel name, say) restarts
    the thread when it changes."""

    name = "llm-quota-thread"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._key: Hashable = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def prepare(self, key: Hashable, stop: threading.Event) -> Callable[[], None]:
        """The new thread's body, which returns once ``stop`` is set. Called under the
        lock, before the thread starts: per-thread state is made here."""
        raise NotImplementedError

    def _alive(self, pid: int, key: Hashable) -> bool:
        thread = self._thread
        return pid == self._pid and key == self._key and thread is not None and thread.is_alive()

    def ensure_running(self, key: Hashable = None) -> None:
        """Start the thread in this process (again after a fork, or a new ``key``)."""
        pid = os.getpid()
        if self._alive(pid, key):
            return
        with self._lock:
            if self._alive(pid, key):
                return
            if self._stop is not None and pid == self._pid:
                self._stop.set()  # the old key's thread ends within its poll interval
            self._pid, self._key = pid, key
            self._stop = stop = threading.Event()
            self._thread = threading.Thread(
                target=self.prepare(key, stop), name=self.name, daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._stop is not None:
                self._stop.set()
            self._pid = self._key = self._thread = self._stop = None

    @property
    def running(self) -> bool:
        """Whether this process has the thread (a forked child has not, until asked)."""
        return self._alive(os.getpid(), self._key)
