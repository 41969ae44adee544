"""Fixtures for every group: the pinned clock, fast password hashing, this run's own
Celery queue. The Redis fixtures live in ``tests/support/fixtures.py``, loaded by the
integration and system groups only; the unit group runs with no Redis at all."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from tests.support.clock import Clock


@pytest.fixture
def clock():
    """Pinned far in the future: Redis expires keys by its own real clock, so a
    counter written under a past date would vanish the moment it is created."""
    return Clock(datetime(2099, 11, 27, 12, 0, tzinfo=UTC))


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Tests create many users; PBKDF2's deliberate slowness buys nothing here."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(scope="session", autouse=True)
def memory_journal():
    """The outage journal in memory, as before ``JOURNAL_DIR``, unless a test sets a
    directory of its own: the demo's ``var/journal`` is shared by every run, and a file
    one test left would be adopted (and charged) by another. Servers the tests start
    inherit the environment variable."""
    import os

    from django.conf import settings

    from llm_quota.conf import quota_settings

    os.environ["LLMQ_JOURNAL_DIR"] = ""
    settings.LLM_QUOTA["JOURNAL_DIR"] = None
    quota_settings.reload()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's, closing the connection pools (PostgreSQL, ``project/settings``)
    before the test database is dropped: their idle connections would keep it alive."""
    yield
    from django.db import connections

    with django_db_blocker.unblock():
        for connection in connections.all():
            if getattr(connection, "pool", None) is not None:
                connection.close_pool()


@pytest.fixture(scope="session", autouse=True)
def celery_queue():
    """This run's own Celery queue: the shared broker may carry other people's workers,
    and they must not take our tasks (nor we theirs). Set before Celery builds its
    queue table, which it then keeps for the whole process. (It connects to nothing.)"""
    from project.celery import app

    name = f"llmq-test-{uuid.uuid4().hex[:10]}"
    app.conf.task_default_queue = name
    return name
