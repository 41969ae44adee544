"""Several gunicorn workers, uvicorn workers and Celery workers on one quota.

Each test starts real servers (``tests/system/scale_site``) on a spare port, sharing this
test's Redis key prefix and a temporary database, and checks from outside what their
users would see: exact admission, zero overspend, and tier edits reaching every
worker at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings

from llm_quota.ledger.sync_driver import Ledger
from tests.support import ports

ROOT = Path(__file__).resolve().parents[2]
COST = 100 + 50 * 4  # every gated call of tests/system/scale_site: 300 base tokens

pytestmark = pytest.mark.slow


def migrated_site(directory: Path) -> dict:
    """The environment of ``tests/system/scale_site`` processes, on a migrated database file."""
    db = directory / "db.sqlite3"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{db}", "REDIS_URL": settings.REDIS_URL,
           "DJANGO_SETTINGS_MODULE": "tests.system.scale_site.settings"}  # fmt: skip
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT, env=env, check=True, timeout=120,
    )  # fmt: skip
    return env


@pytest.fixture(scope="module")
def site_db(tmp_path_factory):
    """A migrated database file every process of the module shares."""
    return migrated_site(tmp_path_factory.mktemp("scale"))


@pytest.fixture
def site(site_db, quota_prefix):
    return {**site_db, "LLM_QUOTA_KEY_PREFIX": quota_prefix, "SCALE_PREFIX": quota_prefix}


def admin(env, *argv) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tests.system.scale_site.admin", *argv],
        cwd=ROOT, env=env, check=True, timeout=60, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.strip()


def spare_port() -> int:
    return ports.spare_port()


def get(url: str, method: str = "GET") -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextmanager
def serving(command: list[str], env: dict, port: int, probe: str):
    """Run a server until the block ends; wait until ``probe`` answers."""
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[2]} exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                get(f"http://127.0.0.1:{port}{probe}")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def gunicorn(env: dict, workers: int, port: int) -> list[str]:
    """Sync workers: each takes one request at a time, so concurrent calls spread."""
    return [
        sys.executable, "-m", "gunicorn", "tests.system.scale_site.wsgi:application",
        "--workers", str(workers), "--worker-class", "sync",
        "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5", "--log-level", "warning",
    ]  # fmt: skip


def uvicorn(
    env: dict, workers: int, port: int, app: str = "tests.system.scale_site.asgi:application"
) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", app,
        "--workers", str(workers), "--port", str(port), "--host", "127.0.0.1",
        "--lifespan", "off", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def every_worker(url: str, workers: int, rounds: int = 40) -> dict[int, dict]:
    """Ask until each of ``workers`` processes has answered; their latest answers."""
    seen: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=workers * 4) as pool:
        for _ in range(rounds):
            for status, body in pool.map(get, [url] * workers * 4):
                assert status == 200
                seen[body["pid"]] = body
            if len(seen) >= workers:
                return seen
    raise AssertionError(f"only {len(seen)} of {workers} workers answered")


def test_tier_edit_reaches_every_gunicorn_worker_at_once(site, quota_prefix):
    pk = admin(site, "seed", f"{quota_prefix}-edit", "requests_per_minute=100")
    port = spare_port()
    with serving(gunicorn(site, 3, port), site, port, f"/policy/{pk}/") as url:
        before = every_worker(f"{url}/policy/{pk}/?hold=0.05", 3)
        assert {w["requests_per_minute"] for w in before.values()} == {100}
        # Another process saves the tier, as the admin would. Every worker caches the
        # old row for an hour (CONFIG_CACHE_SECONDS): only the broadcast can refresh it.
        admin(site, "edit", f"{quota_prefix}-edit", "requests_per_minute=7")
        saved = time.monotonic()
        while True:
            after = every_worker(f"{url}/policy/{pk}/?hold=0.05", 3)
            fresh = {w["requests_per_minute"] for w in after.values()}
            if fresh == {7} or time.monotonic() - saved > 5:
                break
        assert fresh == {7}, after
        assert set(after) == set(before)  # the same workers, no restart


def test_gunicorn_workers_admit_exactly_and_never_overspend(site, quota_prefix, redis_client):
    limit, callers = 30 * COST + 100, 80  # room for 30 calls; too little to clamp a 31st
    pk = admin(site, "seed", f"{quota_prefix}-wsgi", f"tokens_per_month={limit}")
    port = spare_port()
    with serving(gunicorn(site, 3, port), site, port, f"/policy/{pk}/") as url:
        with ThreadPoolExecutor(max_workers=callers) as pool:
            answers = list(pool.map(lambda _: get(f"{url}/call/{pk}/", "POST"), range(callers)))
    admitted = [body for status, body in answers if status == 200]
    refused = [body for status, body in answers if status == 429]
    assert len(admitted) == 30 and len(refused) == callers - 30
    assert {body["limit"] for body in refused} == {"tokens_per_month"}
    assert len({body["pid"] for _, body in answers}) > 1  # several workers took part
    usage = Ledger(redis_client, prefix=quota_prefix).usage(pk)
    assert usage.tokens_this_month == 30 * COST <= limit
    assert usage.reserved == 0 and usage.in_flight == 0


def test_uvicorn_workers_serve_64_concurrent_calls_without_blocking_the_loop(
    site, quota_prefix, redis_client
):
    limit, callers = 20 * COST, 64  # room for exactly 20 calls
    pk = admin(site, "seed", f"{quota_prefix}-asgi", f"tokens_per_month={limit}")
    port = spare_port()
    with serving(uvicorn(site, 2, port), site, port, "/heartbeat/") as url:
        with ThreadPoolExecutor(max_workers=callers) as pool:
            answers = list(pool.map(lambda _: get(f"{url}/acall/{pk}/", "POST"), range(callers)))
        beats = every_worker(f"{url}/heartbeat/", 2)
    admitted = [body for status, body in answers if status == 200]
    assert len(admitted) == 20
    assert all(status in (200, 429) for status, _ in answers)
    usage = Ledger(redis_client, prefix=quota_prefix).usage(pk)
    assert usage.tokens_this_month == 20 * COST and usage.reserved == 0
    # Each worker's loop kept ticking (every 2 ms) through the burst: never frozen the
    # way a blocking Redis or ORM call would freeze it (speed: ``make bench``).
    gaps = {pid: beat["max_gap"] for pid, beat in beats.items()}
    print(f"uvicorn heartbeat max gap per worker: {gaps}")
    assert max(gaps.values()) < 2.0, gaps


def test_celery_workers_admit_exactly_and_never_overspend(site, quota_prefix, redis_client):
    from tests.system.scale_site.celery import broker_url, make_app

    limit, tasks = 25 * COST + 100, 60  # room for exactly 25 calls
    pk = admin(site, "seed", f"{quota_prefix}-celery", f"tokens_per_month={limit}")
    broker = broker_url(settings.REDIS_URL)
    env = {**site, "SCALE_BROKER_URL": broker}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.system.scale_site.celery", "worker",
             "--concurrency", "3", "--pool", "prefork", "--hostname", f"w{n}-{quota_prefix}@%h",
             "--queues", quota_prefix, "--without-gossip", "--without-mingle",
             "--without-heartbeat", "--loglevel", "warning"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        for n in range(2)
    ]
    try:
        app = make_app(broker, quota_prefix)
        for _ in range(tasks):
            app.send_task("scale_site.gated_call", args=[int(pk)], queue=quota_prefix)
        deadline = time.monotonic() + 120
        outcomes: dict[bytes, bytes] = {}
        while time.monotonic() < deadline:
            outcomes = redis_client.hgetall(f"{quota_prefix}:outcomes")
            if sum(int(v) for v in outcomes.values()) == tasks:
                break
            time.sleep(0.2)
        pids = redis_client.hgetall(f"{quota_prefix}:pids")
    finally:
        for proc in workers:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert int(outcomes.get(b"admitted", 0)) == 25
    assert int(outcomes.get(b"refused", 0)) == tasks - 25
    assert len(pids) > 1  # several worker processes took part
    usage = Ledger(redis_client, prefix=quota_prefix).usage(pk)
    assert usage.tokens_this_month == 25 * COST and usage.reserved == 0
