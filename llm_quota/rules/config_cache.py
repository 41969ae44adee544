"""A per-process memo of admin-managed rows, dropped on every save, in every process.

Tiers, quotas and prices are read on every gated request; a database query each
time would double the cost of the gate. A save drops the memo at once in the saving
process (signals in ``apps.py``) and, through ``config_broadcast``, in every other
process; ``CONFIG_CACHE_SECONDS`` bounds how long a row lives regardless, a backstop
for an announcement missed while a process was cut off from Redis.

Users and API keys are cached here too, one entry each, so the memo is bounded: past
``MAX_ENTRIES`` the least recently read entry goes, and rows every request reads
(prices, the default tier) stay however many users a process serves.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from llm_quota.conf import quota_settings, reset_on_change

T = TypeVar("T")

#: Entries a process keeps; past it, the least recently read one is dropped.
MAX_ENTRIES = 10_000

#: What ``peek`` returns for a key that must be loaded.
MISSING: Any = object()


class MustLoad(Exception):
    """Raised instead of a load inside ``memory_only()``: the caller retries where a
    load may block (in a thread, for async code)."""


_memory_only: ContextVar[bool] = ContextVar("llmq_config_memory_only", default=False)


@contextmanager
def memory_only() -> Iterator[None]:
    """Within it, a cache miss raises ``MustLoad`` rather than reading the database:
    async code runs a step on the event loop this way, and in a thread only on a miss."""
    token = _memory_only.set(True)
    try:
        yield
    finally:
        _memory_only.reset(token)


def ensure_may_load() -> None:
    """Call before a load that bypasses ``ConfigCache.get`` (see ``memory_only``)."""
    if _memory_only.get():
        raise MustLoad


class ConfigCache:
    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, tuple[float, int, Any]] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()
        #: Called before each read; ``apps.py`` makes it start this process' listener.
        self.before_read: Callable[[], None] | None = None

    def peek(self, key: Hashable) -> Any:
        """The cached value, or ``MISSING``: lets async code skip a thread hop on a hit."""
        if self.before_read is not None:
            self.before_read()
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry[1] == self._generation
            and time.monotonic() - entry[0] < float(quota_settings.CONFIG_CACHE_SECONDS)
        ):
            try:
                self._entries.move_to_end(key)
            except KeyError:  # dropped by another thread meanwhile: still a good value
                pass
            return entry[2]
        return MISSING

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        found = self.peek(key)
        if found is not MISSING:
            return found
        ensure_may_load()
        generation = self._generation
        now = time.monotonic()
        value = load()
        with self._lock:
            # A save that raced this load wins: don't store what it invalidated.
            if generation == self._generation:
                self._entries[key] = (now, generation, value)
                self._entries.move_to_end(key)
                while len(self._entries) > MAX_ENTRIES:
                    self._entries.popitem(last=False)
        return value

    @property
    def generation(self) -> int:
        """Bumped by every invalidation (tests and diagnostics read it)."""
        return self._generation

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()


config_cache = ConfigCache()

reset_on_change(config_cache.invalidate)
