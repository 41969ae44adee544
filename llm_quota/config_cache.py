"""A per-process memo of admin-managed rows, dropped on every save.

Tiers, quotas and prices are read on every gated request; a database query each
time would double the cost of the gate. Saves in this process invalidate at once
(signals in ``apps.py``); other processes re-read after ``CONFIG_CACHE_SECONDS``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigCache:
    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[float, int, Any]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        from llm_quota.conf import quota_settings

        ttl = float(quota_settings.CONFIG_CACHE_SECONDS)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[1] == self._generation and now - entry[0] < ttl:
            return entry[2]
        generation = self._generation
        value = load()
        with self._lock:
            # A save that raced this load wins: don't store what it invalidated.
            if generation == self._generation:
                if len(self._entries) > 10_000:
                    self._entries.clear()
                self._entries[key] = (now, generation, value)
        return value

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()


config_cache = ConfigCache()
