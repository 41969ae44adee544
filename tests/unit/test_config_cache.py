"""The per-process memo stays bounded without dropping what every request reads: a
process serving more users than it keeps evicts the least recently read ones, never
the prices or the default tier (each a query on every request if it were lost)."""

from __future__ import annotations

from llm_quota.rules import config_cache as module
from llm_quota.rules.config_cache import MISSING, ConfigCache


def test_many_users_evict_the_least_recently_read_not_the_shared_rows():
    cache = ConfigCache()
    loads = {"prices": 0, "default-tier": 0}

    def shared(name):
        def load():
            loads[name] += 1
            return name

        return load

    kept = getattr(module, "MAX_ENTRIES", 10_000)
    users = 2 * kept + 10
    for pk in range(users):  # each request: the shared rows, then its user
        cache.get("prices", shared("prices"))
        cache.get("default-tier", shared("default-tier"))
        cache.get(("policy", pk), lambda pk=pk: pk)
    assert loads == {"prices": 1, "default-tier": 1}
    assert len(cache._entries) == kept
    assert cache.peek(("policy", 0)) is MISSING  # the oldest user went
    assert cache.peek(("policy", users - 1)) == users - 1


def test_a_read_keeps_an_entry_a_later_load_would_evict(monkeypatch):
    monkeypatch.setattr(module, "MAX_ENTRIES", 3)
    cache = ConfigCache()
    for pk in range(3):
        cache.get(pk, lambda pk=pk: pk)
    assert cache.peek(0) == 0  # read: now the most recent
    cache.get(3, lambda: 3)
    assert [cache.peek(pk) for pk in range(4)] == [0, MISSING, 2, 3]
