"""Runs in its own process: gated calls through the real admission path (breaker,
fail-open, journal) on a Sentinel-managed Redis, for ``test_sentinel_failover``.

``python -m tests.system.failover_worker <json config>``; prints one JSON line: what it
billed per user (what an upstream would bill: the usage it settled), how its calls
ended, and when Redis decided each call it decided, admitted or refused (the test
finds the failover's end in them).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time


def configure(config: dict) -> None:
    """Django on the demo's settings, its cache pointed at the Sentinels (django-redis'
    SentinelClient, as docs/pages/operations.md shows)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django
    from django.conf import settings

    django.setup()
    settings.DJANGO_REDIS_CONNECTION_FACTORY = "django_redis.pool.SentinelConnectionFactory"
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://{config['service']}/0",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "SENTINELS": [("127.0.0.1", port) for port in config["sentinels"]],
                "SOCKET_CONNECT_TIMEOUT": 0.5,
                "SOCKET_TIMEOUT": 0.5,
            },
        }
    }
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "KEY_PREFIX": config["prefix"],
        "BREAKER_COOLDOWN": 0.25,
        "FAIL_OPEN_DIVISOR": config["processes"],
    }
    from llm_quota.conf import quota_settings

    quota_settings.reload()


def main(config: dict) -> None:
    configure(config)
    from llm_quota.exceptions import BudgetExceeded, QuotaUnavailable, RateLimited
    from llm_quota.ledger.resilience import outage, resilient
    from llm_quota.quota import admission
    from llm_quota.quota.drivers import run
    from llm_quota.rules.accounting import Estimate, Limits, Price
    from llm_quota.rules.policy import UserPolicy

    price = Price("gpt-4o", 1_000_000, 4_000_000)
    policy = UserPolicy(
        tier="free",
        soft_limit_percent=1000,  # no soft-limit alerts: they read the database
        limits=Limits(
            requests_per_minute=100_000,
            tokens_per_month=config["tokens_per_month"],
        ),
    )
    from llm_quota.ledger.config_broadcast import listener
    from llm_quota.rules.config_cache import config_cache

    # Subscribing drops what was cached before: subscribe first, then cache.
    listener.ensure_running()
    listener.subscribed.wait(5)
    for user in config["users"]:  # the policy from memory: the workers have no database
        config_cache.get(("policy", user), lambda: policy)
    print("started", flush=True)
    users, deadline = config["users"], time.time() + config["seconds"]
    lock = threading.Lock()
    billed = {str(u): 0 for u in users}
    ends = {"metered": 0, "blind": 0, "refused": 0, "unavailable": 0, "error": 0}
    errors: list[str] = []
    metered_at: list[float] = []

    def one(user: int, rng: random.Random) -> None:
        try:
            decision = admission.admit(user, Estimate(price, 50, 50), policy=policy)
        except (RateLimited, BudgetExceeded) as refused:  # a 429, as the contract answers
            kind = "refused"
            if refused.decision is not None:  # Redis decided (not the fallback limiter)
                with lock:
                    metered_at.append(time.time())
            time.sleep(0.02)  # a client backing off
        except QuotaUnavailable:
            kind = "unavailable"
        except Exception as exc:  # a 500: what the test counts as a failed request
            kind = "error"
            errors.append(repr(exc)[:200])
        else:
            decided = time.time()
            reservation = decision.reservation
            time.sleep(rng.uniform(0.002, 0.01))  # the upstream call
            output = rng.randint(0, reservation.max_tokens)
            try:
                admission.settle(reservation, {"prompt_tokens": 50, "completion_tokens": output})
            except Exception as exc:
                errors.append(repr(exc)[:200])
            kind = "blind" if reservation.unmetered else "metered"
            with lock:
                billed[str(user)] += 50 + 4 * output
                if kind == "metered":
                    metered_at.append(decided)
        with lock:
            ends[kind] += 1

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        while time.time() < deadline:
            one(rng.choice(users), rng)

    threads = [threading.Thread(target=loop, args=(os.getpid() * 100 + n,))
               for n in range(config["threads"])]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    def nothing(_ledger):  # a call that only lets resilient() replay the journal
        return None
        yield

    drain_until = time.time() + 20
    while len(outage().journal) and time.time() < drain_until:
        run(resilient(nothing, lambda _error: None))
        time.sleep(0.05)
    print(json.dumps({
        "billed": billed, "ends": ends, "errors": errors[:5], "metered_at": sorted(metered_at),
        "journal_left": len(outage().journal),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
