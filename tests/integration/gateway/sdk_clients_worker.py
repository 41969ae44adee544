"""Runs in a spawned process: SDK clients in threads, calling until the budget refuses.

Free of Django, so a process starts fast and shares nothing with the server but HTTP.
"""

from __future__ import annotations

import threading

import openai

MSGS = [{"role": "user", "content": "Say hello in five words."}]


def clients(base_url, token, model, max_tokens, threads, calls, start, results):
    usages, errors = [], []
    lock = threading.Lock()

    def one():
        # Retries cover connections the test server's listen backlog turns away; a
        # budget refusal is never retried (x-should-retry: false).
        client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=3, timeout=60)
        start.wait()
        for _ in range(calls):
            try:
                reply = client.chat.completions.create(
                    model=model, messages=MSGS, max_tokens=max_tokens
                )
            except openai.RateLimitError as exc:
                if exc.code == "insufficient_quota":
                    return  # the budget is spent: this worker is done
                with lock:
                    errors.append(f"{exc.code}: {exc.message}")
                return
            except openai.APIError as exc:
                with lock:
                    errors.append(repr(exc))
                return
            with lock:
                usages.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))

    pool = [threading.Thread(target=one) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    results.put((usages, errors))
