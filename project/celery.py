"""The demo project's Celery app: the snapshot on a beat schedule, alert webhooks.

Start them beside the server (``make demo`` does)::

    celery -A project worker --loglevel=info
    celery -A project beat --loglevel=info

The broker is ``CELERY_BROKER_URL``, by default the same Redis as ``REDIS_URL``
(``project/settings.py``).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def schedule_snapshot(sender: Celery, **kwargs: Any) -> None:
    """Every ``SNAPSHOT_INTERVAL`` seconds, copy Redis usage into the database."""
    from llm_quota.tasks import beat_schedule

    sender.conf.beat_schedule = {**beat_schedule(), **(sender.conf.beat_schedule or {})}
