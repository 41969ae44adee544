"""PostgreSQL connections stay bounded under the demo's servers (issue #12, D5).

A threaded server gives each request a thread, and an ASGI worker each request its
own thread for sync code: with a connection per thread kept open (``CONN_MAX_AGE``),
a burst of 64 calls opened a connection per call, and a few workers filled
PostgreSQL's ``max_connections``. The demo project uses a pool per process instead
(``DATABASE_POOL_MAX_SIZE``), and the gateway hands its connection back before it
waits on the upstream, so a long LLM call holds none.

Each test serves the demo project (``runserver``, threaded; the README's ``uvicorn``
recipe with the async gateway) on a database of its own, fires 64 streamed calls at
once whose upstream holds every stream open until all 64 were answered, and counts
that database's rows in ``pg_stat_activity`` throughout.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid

import httpx
import pytest
from django.conf import settings

from llm_quota.ledger.sync_driver import Ledger
from tests.support import fake_upstream
from tests.support.fake_upstream import UpstreamServer
from tests.support.gateway import MSGS
from tests.system.test_many_processes import ROOT, admin, serving, spare_port, uvicorn

pytestmark = pytest.mark.slow

CALLERS, CAP = 64, 30
#: Connections opened at once: runserver listens with a backlog of 10, and SYNs past
#: it wait for the kernel's retries (1, 3, 7... s). The calls are in flight together
#: all the same: the upstream holds every stream until all 64 were answered.
OPENING = 8
POOL_MAX_SIZE = 4
#: Connections besides the pools': runserver's start-up checks hold one in its main
#: thread, a worker may be opening one as another is closed.
SLACK = 2


def _server() -> dict:
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL=postgres://...)")
    return db


def _connect(db: dict, name: str):
    import psycopg

    return psycopg.connect(
        dbname=name, user=db["USER"], password=db["PASSWORD"] or None,
        host=db["HOST"] or None, port=db["PORT"] or None, autocommit=True,
    )  # fmt: skip


def _url(db: dict, name: str) -> str:
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{name}"


@pytest.fixture
def database():
    """A database of this test's own on the suite's PostgreSQL server, dropped after."""
    db = _server()
    name = f"llmq_conns_{uuid.uuid4().hex[:10]}"
    with _connect(db, "postgres") as admin_connection:
        admin_connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield db, name
    finally:
        with _connect(db, "postgres") as admin_connection:
            admin_connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Peak:
    """Counts the database's connections every 10 ms while the block runs."""

    def __init__(self, db: dict, name: str) -> None:
        self.db, self.name, self.most = db, name, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def count(self, connection) -> int:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        return connection.execute(query, (self.name,)).fetchone()[0]

    def _watch(self) -> None:
        with _connect(self.db, "postgres") as connection:  # not counted: another database
            while not self._stop.is_set():
                self.most = max(self.most, self.count(connection))
                self._stop.wait(0.01)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


async def burst(url: str, token: str, upstream: UpstreamServer) -> list[tuple[int, bytes]]:
    """``CALLERS`` streamed calls in flight at once; the upstream lets them all go once
    every one has been answered (or refused)."""
    body = {"model": "up-hold", "messages": MSGS, "max_tokens": CAP, "stream": True}
    headers = {"Authorization": f"Bearer {token}"}
    answered, opening, waiting = asyncio.Event(), asyncio.Semaphore(OPENING), [CALLERS]
    limits = httpx.Limits(max_connections=CALLERS)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def call() -> tuple[int, bytes]:
            async with opening:
                response = await client.send(
                    client.build_request(
                        "POST", f"{url}/v1/chat/completions", json=body, headers=headers
                    ),
                    stream=True,
                )
            try:
                waiting[0] -= 1
                if not waiting[0]:
                    answered.set()
                return response.status_code, await response.aread()
            finally:
                await response.aclose()

        calls = [asyncio.create_task(call()) for _ in range(CALLERS)]
        await asyncio.wait_for(answered.wait(), 60)
        upstream.hold.set()
        return await asyncio.gather(*calls)


@pytest.fixture
def site(database, quota_prefix, upstream):
    """The demo project's environment on the test's database, migrated and seeded."""
    db, name = database
    env = {
        **os.environ,
        "DATABASE_URL": _url(db, name),
        "DATABASE_POOL_MAX_SIZE": str(POOL_MAX_SIZE),
        "REDIS_URL": settings.REDIS_URL,
        "LLM_QUOTA_KEY_PREFIX": quota_prefix,
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": "sk-gateway-key",
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT, env=env, check=True, timeout=120,
    )  # fmt: skip
    scale = {**env, "DJANGO_SETTINGS_MODULE": "tests.system.scale_site.settings"}
    admin(scale, "price", "up-*", "1", "2")
    pk = admin(scale, "seed", f"{quota_prefix}-pg", "tokens_per_month=10000000")
    return env, pk, admin(scale, "token", pk)


def runserver(port: int) -> list[str]:
    """The demo's own server (``make demo``): a thread per request, without limit."""
    return [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]


@pytest.mark.parametrize(
    "server, workers",
    [
        pytest.param(runserver, 1, id="runserver"),
        pytest.param(
            lambda port: uvicorn({}, 2, port, app="project.asgi:application"), 2, id="uvicorn"
        ),
    ],
)
def test_a_64_call_burst_holds_no_more_connections_than_the_pools(
    site, database, upstream, redis_client, quota_prefix, server, workers
):
    env, pk, token = site
    db, name = database
    port = spare_port()
    with serving(server(port), env, port, "/v1/models") as url:
        with Peak(db, name) as peak:
            answers = asyncio.run(burst(url, token, upstream))
        with _connect(db, "postgres") as connection:
            after = peak.count(connection)

    statuses = sorted({status for status, _ in answers})
    print(f"{CALLERS} calls: statuses {statuses}, {peak.most} connections at most, {after} after")
    assert statuses == [200]  # no 500: nobody was refused a connection
    for _, body in answers:  # every stream ran to its end
        assert body.count(b'"content"') == min(CAP, fake_upstream.WORDS)
    assert peak.most <= workers * POOL_MAX_SIZE + SLACK
    usage = Ledger(redis_client, prefix=quota_prefix).usage(pk)
    assert usage.reserved == 0 and usage.in_flight == 0
    assert [(row.model, row.requests) for row in usage.by_model] == [("up-hold", CALLERS)]
