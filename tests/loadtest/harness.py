"""A gateway served by gunicorn over a scratch database, with the tests' upstream.

Shared by the load test and the end-to-end benchmark: both need the same stack, and
only differ in what they fire at it and what they report.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "up-slow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@contextmanager
def stack(*, users: int, latency: float, workers: int = 4, threads: int = 16, tier: dict):
    """Yield (base_url, tokens, ledger, price) with gunicorn serving the project."""
    import tests.support.fake_upstream as fake_upstream

    scratch = Path(tempfile.mkdtemp(prefix="llmq-load-"))
    fake_upstream.LATENCY = latency
    upstream = fake_upstream.UpstreamServer().start()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "LLM_QUOTA_KEY_PREFIX": f"load{uuid.uuid4().hex[:8]}",
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": "load-test",
        "DJANGO_DEBUG": "0",
    }
    env.setdefault("DATABASE_URL", f"sqlite:///{scratch / 'load.sqlite3'}")
    os.environ.update(
        {
            k: env[k]
            for k in (
                "DJANGO_SETTINGS_MODULE",
                "LLM_QUOTA_KEY_PREFIX",
                "OPENAI_BASE_URL",
                "OPENAI_API_KEY",
                "DATABASE_URL",
                "DJANGO_DEBUG",
            )
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    accounts, price = _seed(users, tier)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "project.wsgi", "-w", str(workers),
         "-k", "gthread", "--threads", str(threads), "-b", f"127.0.0.1:{port}",
         "--log-level", "warning", "--graceful-timeout", "5"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        wait_for_port(port)
        from llm_quota.ledger.default import get_ledger

        yield f"http://127.0.0.1:{port}", accounts, get_ledger(), price
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        upstream.stop()
        _cleanup(env["LLM_QUOTA_KEY_PREFIX"])


def _seed(users: int, tier: dict):
    from django.contrib.auth import get_user_model

    from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
    from llm_quota.models import ModelPrice, Tier, UserQuota
    from llm_quota.rules.pricing import price_for

    run = uuid.uuid4().hex[:6]
    level = Tier.objects.create(name=f"load-{run}", allowed_models="", **tier)
    ModelPrice.objects.update_or_create(
        model=MODEL,
        defaults=dict(input_multiplier=Decimal("1"), output_multiplier=Decimal("4"),
                      default_max_output_tokens=64),
    )  # fmt: skip
    accounts = []
    for n in range(users):
        user = get_user_model().objects.create_user(f"load-{run}-{n}")
        UserQuota.objects.create(user=user, tier=level)
        token = ScopedTokenObtainPairSerializer.get_token(user).access_token
        accounts.append((user.pk, str(token)))
    return accounts, price_for(MODEL)


def _cleanup(prefix: str) -> None:
    from django_redis import get_redis_connection

    client = get_redis_connection("default")
    batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(batch), 500):
        client.delete(*batch[start : start + 500])
