"""Celery tasks: thin adapters over ``snapshot.py`` and ``alerts.py``.

The snapshot task is safe to run twice, late or concurrently (see ``snapshot.py``),
so the beat entry's ``expires`` only saves work: ticks queued while no worker ran
are dropped instead of being replayed one after another.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from celery import shared_task
from django.db import DatabaseError
from redis.exceptions import RedisError

from llm_quota.conf import quota_settings
from llm_quota.quota.alerts import WEBHOOK_TASK

logger = logging.getLogger("llm_quota")

SNAPSHOT_TASK = "llm_quota.snapshot_usage"


@shared_task(
    name=SNAPSHOT_TASK,
    autoretry_for=(RedisError, DatabaseError),
    retry_backoff=True,
    max_retries=3,
)
def snapshot_usage() -> dict[str, Any]:
    """Copy Redis usage into ``UsageSnapshot`` (returns what the run did)."""
    from llm_quota.reporting.snapshot import SnapshotBusy
    from llm_quota.reporting.snapshot import snapshot_usage as run_snapshot

    try:
        return run_snapshot().as_dict()
    except SnapshotBusy:
        # The run holding the lock copies everything this one would have.
        logger.info("usage snapshot skipped: another run is in progress")
        return {"busy": True}


def beat_schedule() -> dict[str, dict[str, Any]]:
    """The beat entry that runs the snapshot every ``SNAPSHOT_INTERVAL`` seconds."""
    interval = float(quota_settings.SNAPSHOT_INTERVAL)
    return {
        "llm-quota-snapshot": {
            "task": SNAPSHOT_TASK,
            "schedule": interval,
            "options": {"expires": interval},
        }
    }


class WebhookRejected(Exception):
    """The receiver answered 4xx: retrying the same body will not help."""


@shared_task(
    name=WEBHOOK_TASK,
    autoretry_for=(urllib.error.URLError, OSError),
    retry_backoff=True,
    max_retries=5,
    ignore_result=True,
)
def post_alert_webhook(event: dict[str, Any]) -> int:
    """POST one alert as JSON to ``ALERT_WEBHOOK_URL``; retried on network errors and 5xx."""
    url = quota_settings.ALERT_WEBHOOK_URL
    if not url:
        return 0
    request = urllib.request.Request(
        url,
        data=json.dumps(event).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "django-llm-quota"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(  # noqa: S310 - the URL is the operator's setting
            request, timeout=float(quota_settings.ALERT_WEBHOOK_TIMEOUT)
        ) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            raise WebhookRejected(f"{url} answered {exc.code}") from exc
        raise
