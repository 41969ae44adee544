"""Runs in a spawned process: threads that reserve against one budget at once.

Kept free of Django so a process starts fast and shares nothing with the parent but
the Redis server.
"""

from __future__ import annotations

import random
import threading

import redis

from llm_quota.ledger.connections import cluster_client, is_cluster_url
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits, Price


def connect(url, threads):
    if is_cluster_url(url):
        return cluster_client(url, max_connections=threads + 4)
    return redis.Redis.from_url(url, max_connections=threads + 4)


def burst(url, prefix, limit, prompt, output, threads, start, settle_now, results, settle_at_once):
    ledger = Ledger(connect(url, threads), prefix=prefix)
    limits = Limits(tokens_per_month=limit)
    price = Price("gpt-4o", 1_000_000, 1_000_000)
    admitted, charged = [], []
    lock = threading.Lock()
    rng = random.Random()

    def one():
        start.wait()
        decision = ledger.reserve(7, limits, Estimate(price, prompt, output), clamp=False)
        if not decision.allowed:
            return
        if not settle_at_once:
            with lock:
                admitted.append(decision.reservation)
            return
        used = rng.randint(0, output)
        ledger.settle(decision.reservation, ActualUsage(prompt, used))
        with lock:
            admitted.append(decision.reservation)
            charged.append(prompt + used)

    pool = [threading.Thread(target=one) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    results.put(("reserved", len(admitted)))
    if not settle_at_once:
        settle_now.wait()
        for reservation in admitted:
            used = rng.randint(0, output)
            ledger.settle(reservation, ActualUsage(prompt, used))
            charged.append(prompt + used)
    results.put(("charged", sum(charged)))


def global_burst(url, prefix, first_user, cap, prompt, output, threads, start, results):
    """One user per thread, all under one global cap: admitted, then settled at cost."""
    ledger = Ledger(connect(url, threads), prefix=prefix)
    limits = Limits(global_tokens_per_month=cap)
    price = Price("gpt-4o", 1_000_000, 1_000_000)
    admitted, lock = [], threading.Lock()

    def one(uid):
        start.wait()
        decision = ledger.reserve(uid, limits, Estimate(price, prompt, output), clamp=False)
        if decision.allowed:
            ledger.settle(decision.reservation, ActualUsage(prompt, output))
            with lock:
                admitted.append(uid)

    pool = [threading.Thread(target=one, args=(first_user + n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    results.put(admitted)


def team_burst(url, prefix, users, per_user, user_cap, team_cap, prompt, output, start, results):
    """``per_user`` threads for each of ``users``, all members of team 77: each reserves
    (clamping allowed), then settles a random usage up to what it was granted. Puts what
    each member was charged and how many reserves each limit refused."""
    ledger = Ledger(connect(url, len(users) * per_user), prefix=prefix)
    limits = Limits(tokens_per_month=user_cap, team="77", team_tokens_per_month=team_cap)
    price = Price("gpt-4o", 1_000_000, 1_000_000)
    charged: dict[int, int] = {uid: 0 for uid in users}
    refused: dict[str, int] = {}
    lock = threading.Lock()
    rng = random.Random()

    def one(uid):
        start.wait()
        decision = ledger.reserve(uid, limits, Estimate(price, prompt, output))
        if not decision.allowed:
            with lock:
                refused[decision.limit] = refused.get(decision.limit, 0) + 1
            return
        used = rng.randint(0, decision.reservation.max_tokens)
        ledger.settle(decision.reservation, ActualUsage(prompt, used))
        with lock:
            charged[uid] += prompt + used

    pool = [threading.Thread(target=one, args=(uid,)) for uid in users for _ in range(per_user)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    results.put((charged, refused))
