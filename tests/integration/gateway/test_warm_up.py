"""``warm_up()`` in a worker's ASGI module: what it loaded is frozen out of the
collector's way, so a full collection on the event loop walks only what requests made."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.loadtest.harness import ROOT

PROBE = """
import gc, sys
from llm_quota.gateway.asgi import get_asgi_application
application = get_asgi_application()
from llm_quota.gateway.async_views import warm_up
warm_up(freeze=sys.argv[1] == "freeze")
print(gc.get_freeze_count(), len(gc.get_objects()))
"""


def _worker(mode: str) -> tuple[int, int]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    return int(out[-2]), int(out[-1])


def test_warm_up_freezes_what_the_worker_loaded():
    frozen, left = _worker("freeze")
    # The app, its URL modules, DRF, simplejwt and the tokenizers: tens of thousands of
    # objects a full collection no longer walks; what is left for it is next to nothing.
    assert frozen > 20_000
    assert left < frozen // 100


def test_warm_up_can_leave_the_collector_alone():
    frozen, left = _worker("keep")
    assert frozen == 0 and left > 20_000


LOADED = """
import sys
from llm_quota.gateway.asgi import get_asgi_application
application = get_asgi_application()
from llm_quota.gateway.async_views import warm_up
warm_up(freeze=False)
print("aiohttp" in sys.modules, "llm_quota.gateway.async_http" in sys.modules)
"""


def test_warm_up_imports_the_async_upstream_client():
    """aiohttp's import (tens of milliseconds) is not left to a worker's first call."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    out = subprocess.run(
        [sys.executable, "-c", LOADED], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    ).stdout.split()  # fmt: skip
    assert out[-2:] == ["True", "True"]
