"""``warm_up()`` in a worker's ASGI module: what it loaded is frozen out of the
collector's way, so a full collection on the event loop walks only what requests made,
and the GIL's switch interval is short enough for the request's thread hops to get by
a busy loop thread."""

from __future__ import annotations

import os
import subprocess
import sys

from llm_quota.gateway.async_views import SWITCH_INTERVAL
from tests.loadtest.harness import ROOT

PROBE = """
import gc, sys
from llm_quota.gateway.asgi import get_asgi_application
application = get_asgi_application()
from llm_quota.gateway.async_views import warm_up
if sys.argv[1] == "freeze":
    warm_up()
else:
    warm_up(freeze=False, switch_interval=None)
print(gc.get_freeze_count(), len(gc.get_objects()), sys.getswitchinterval())
"""


def _worker(mode: str) -> tuple[int, int, float]:
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
    return int(out[-3]), int(out[-2]), float(out[-1])


def test_warm_up_freezes_what_the_worker_loaded():
    frozen, left, _ = _worker("freeze")
    # The app, its URL modules, DRF, simplejwt and the tokenizers: tens of thousands of
    # objects a full collection no longer walks; what is left for it is next to nothing.
    assert frozen > 20_000
    assert left < frozen // 100


def test_warm_up_shortens_the_switch_interval():
    assert _worker("freeze")[2] == SWITCH_INTERVAL < 0.005  # Python's default


def test_warm_up_can_leave_the_collector_and_the_interval_alone():
    frozen, left, interval = _worker("keep")
    assert frozen == 0 and left > 20_000
    assert interval == 0.005
