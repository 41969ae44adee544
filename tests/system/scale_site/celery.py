"""A Celery app whose workers make gated calls, as a project's LLM tasks would.

Broker keys carry the test's key prefix (``global_keyprefix``) and the queue is named
after it, so these workers never touch another Celery's queues on a shared Redis.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.system.scale_site.settings")


def make_app(broker_url: str, prefix: str) -> Celery:
    app = Celery("scale_site")
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"global_keyprefix": f"{prefix}:celery:"},
        task_default_queue=prefix,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app


def broker_url(redis_url: str) -> str:
    """Celery names a unix socket ``redis+socket://``; redis-py says ``unix://``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://") :]
    return redis_url


app = make_app(
    os.environ.get("SCALE_BROKER_URL", "memory://"), os.environ.get("SCALE_PREFIX", "scale")
)


@app.task(name="scale_site.gated_call")
def gated_call(pk: int) -> None:
    """One gated call; its outcome is counted in Redis for the test to read."""
    from llm_quota import quota_guard
    from llm_quota.exceptions import QuotaExceeded
    from llm_quota.ledger.connections import ledger_client
    from tests.system.scale_site.views import OUTPUT, PROMPT

    outcome = "admitted"
    try:
        with quota_guard(pk, model="gpt-4o", prompt_tokens=PROMPT, max_tokens=OUTPUT) as q:
            q.settle({"prompt_tokens": PROMPT, "completion_tokens": q.max_tokens})
    except QuotaExceeded:
        outcome = "refused"
    prefix = os.environ["SCALE_PREFIX"]
    ledger_client().hincrby(f"{prefix}:outcomes", outcome, 1)
    ledger_client().hincrby(f"{prefix}:pids", str(os.getpid()), 1)
