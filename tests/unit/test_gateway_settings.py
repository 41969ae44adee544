"""``project.gateway_settings``, the recipe for workers that serve only ``/v1/``: it
passes Django's checks (the admin's middleware checks silenced, as the admin is served
elsewhere) and keeps only the gateway's own, async-capable middleware."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.loadtest.harness import ROOT


def test_gateway_settings_pass_the_checks_with_no_thread_hopping_middleware():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.gateway_settings"}
    probe = (
        "import django; django.setup(); from django.conf import settings; "
        "from django.utils.deprecation import MiddlewareMixin; "
        "from django.utils.module_loading import import_string; "
        "print(any(issubclass(import_string(m), MiddlewareMixin) for m in settings.MIDDLEWARE))"
    )
    hops = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert hops.stdout.split()[-1] == "False"  # MiddlewareMixin's halves hop to a thread
    command = [sys.executable, "manage.py", "check", "--fail-level", "ERROR"]
    check = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
