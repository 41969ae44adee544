"""``python -m tests.loadtest [--requests N] [--concurrency C]``."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict

import httpx

from tests.loadtest.harness import MODEL, stack

TIER = dict(
    requests_per_minute=600, tokens_per_minute=60_000, tokens_per_day=2_000_000,
    tokens_per_month=20_000_000, max_concurrent_requests=2,
)  # fmt: skip


def fire(base: str, accounts, total: int, concurrency: int):
    """Send ``total`` requests from ``concurrency`` threads; return per-request results."""
    results: list[tuple[int, float, int, int, int]] = []  # status, seconds, user, in, out
    lock = threading.Lock()
    counter = iter(range(total))
    progress = {"done": 0}

    def one(client: httpx.Client, rng: random.Random) -> None:
        user, token = rng.choice(accounts)
        stream = rng.random() < 0.3
        body = {
            "model": MODEL, "max_tokens": rng.choice([16, 32, 64]),
            "messages": [{"role": "user", "content": "load " * rng.randint(1, 40)}],
            "stream": stream,
        }  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        headers = {"Authorization": f"Bearer {token}"}
        start = time.perf_counter()
        usage = None
        with client.stream("POST", f"{base}/v1/chat/completions", json=body,
                           headers=headers) as response:  # fmt: skip
            if response.status_code == 200 and stream:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        usage = chunk.get("usage") or usage
            else:
                data = json.loads(response.read() or b"{}")
                usage = data.get("usage") if response.status_code == 200 else None
        elapsed = time.perf_counter() - start
        prompt = usage["prompt_tokens"] if usage else 0
        completion = usage["completion_tokens"] if usage else 0
        with lock:
            results.append((response.status_code, elapsed, user, prompt, completion))
            progress["done"] += 1

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            for _ in counter:
                one(client, rng)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        print(f"\r  {progress['done']:>6}/{total} requests", end="", flush=True)
    print()
    return results, time.perf_counter() - began


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args(argv)
    with stack(users=args.users, latency=args.latency, tier=TIER) as (
        base,
        accounts,
        ledger,
        price,
    ):
        print(
            f"gunicorn (4 workers x 16 threads) at {base}; upstream latency {args.latency}s; "
            f"{args.requests} requests, {args.concurrency} concurrent, {args.users} users"
        )
        results, elapsed = fire(base, accounts, args.requests, args.concurrency)
        statuses = Counter(status for status, *_ in results)
        expected: dict[int, int] = defaultdict(int)
        for status, _, user, prompt, completion in results:
            if status == 200:
                expected[user] += price.base_tokens(prompt, completion)
        time.sleep(0.5)  # the last streams' close() settles after their final byte
        mismatched, reserved = [], 0
        for user, _ in accounts:
            usage = ledger.usage(user)
            reserved += usage.reserved + usage.in_flight
            if usage.tokens_this_month != expected[user]:
                mismatched.append((user, usage.tokens_this_month, expected[user]))
        ok_latencies = sorted(t for status, t, *_ in results if status == 200)
        server_errors = sum(n for status, n in statuses.items() if status >= 500)
        print(f"requests/s: {len(results) / elapsed:,.0f}  ({len(results)} in {elapsed:.1f} s)")
        print(f"statuses: {dict(sorted(statuses.items()))}")
        if ok_latencies:
            p50 = statistics.median(ok_latencies)
            p99 = ok_latencies[int(len(ok_latencies) * 0.99) - 1]
            print(f"latency of 200s: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
        print(
            f"5xx: {server_errors}; users whose Redis usage differs from the responses: "
            f"{len(mismatched)}; reserved or in flight at the end: {reserved}"
        )
        for row in mismatched[:5]:
            print(f"  user {row[0]}: Redis {row[1]} vs responses {row[2]}")
        failed = server_errors or mismatched or reserved or len(results) != args.requests
        print("FAILED" if failed else "PASSED")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
