"""Where one gated gateway request spends its time, in process (section 4's profile).

``python -m tests.benchmarks.profile_gate [requests] [-v] [--slow]``: section 4's bodies and
users through Django's test client one at a time (no gunicorn, no sockets), gate on
and gate off, then each path once more with wall-clock timers around its parts: the
two ledger calls (reserve and settle: Redis round trips and their client code), the
rest of the gate (estimation, policy and price lookups, scope, headers), and what
both paths share (JWT, body validation, the fake provider). ``-v`` adds a cProfile
listing of the gated path; ``--slow`` puts section 4's slow HTTP upstream behind both
paths instead of the fake provider. A tool to find what to cut, not a row of the table.
"""

from __future__ import annotations

import cProfile
import importlib
import os
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

#: (label, "module:attribute"), timed inclusive; an indented label runs inside the one
#: above it. Each is patched where its caller looks it up.
PARTS = (
    ("JWT authentication (both paths)",
     "rest_framework_simplejwt.authentication:JWTAuthentication.authenticate"),
    ("permission HasScope", "llm_quota.drf.permissions:HasScope.has_permission"),
    ("  granted_scopes", "llm_quota.drf.permissions:granted_scopes"),
    ("view post", "llm_quota.gateway.views:ChatCompletionsView.post"),
    ("  ChatRequest.from_body (all calls)", "llm_quota.shapes.chat:ChatRequest.from_body"),
    ("  QuotaGuard.admit (admission)", "llm_quota.quota.guard:QuotaGuard.admit"),
    ("    price_in", "llm_quota.quota.admission:price_in"),
    ("    bound_prompt", "llm_quota.quota.admission:bound_prompt"),
    ("    count_prompt", "llm_quota.quota.admission:count_prompt"),
    ("    Ledger.perform (each Redis round trip)", "llm_quota.ledger.sync_driver:Ledger.perform"),
    ("  GatedCall.answer", "llm_quota.gateway.call:GatedCall.answer"),
    ("    upstream_body", "llm_quota.shapes.chat:ChatRequest.upstream_body"),
    ("    fake provider complete", "llm_quota.testing.fake_provider:FakeProvider.complete"),
    ("    HTTP upstream complete", "llm_quota.gateway.upstream:HttpUpstream.complete"),
    ("    QuotaGuard.settle", "llm_quota.quota.guard:QuotaGuard.settle"),
    ("      alerts.after_settle", "llm_quota.quota.alerts:after_settle"),
    ("    headers_for", "llm_quota.drf.throttling:headers_for"),
)  # fmt: skip


class Timers:
    """Wall-clock totals of the ``PARTS``, patched in for one pass, then removed."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        for label, target in PARTS:
            module_name, _, dotted = target.partition(":")
            owner: Any = importlib.import_module(module_name)
            *path, attr = dotted.split(".")
            for name in path:
                owner = getattr(owner, name)
            raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            self._undo.append((owner, attr, raw))
            setattr(owner, attr, self._wrap(label, raw))

    def _wrap(self, label: str, raw: Any) -> Any:
        kind = type(raw) if isinstance(raw, classmethod | staticmethod) else None
        function = raw.__func__ if kind else raw
        self.total[label], self.calls[label] = 0.0, 0

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - start
                self.calls[label] += 1

        return kind(timed) if kind else timed

    def remove(self) -> None:
        for owner, attr, raw in reversed(self._undo):
            setattr(owner, attr, raw)
        self._undo.clear()


def main(argv: list[str]) -> int:
    requests = int(argv[0]) if argv else 400
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    scratch = tempfile.mkdtemp(prefix="llmq-profile-")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{scratch}/profile.sqlite3")
    os.environ.setdefault("DJANGO_DEBUG", "0")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test import Client, override_settings
    from django_redis import get_redis_connection

    from llm_quota.ledger.default import get_ledger, set_default_ledger
    from llm_quota.ledger.sync_driver import Ledger
    from tests.benchmarks.end_to_end import (
        GATED,
        MODEL,
        SLOW_LATENCY,
        SLOW_MODEL,
        UNGATED,
        _bodies,
        _seed,
        in_process_pass,
    )
    from tests.loadtest.harness import _cleanup

    call_command("migrate", verbosity=0, interactive=False)
    tokens = _seed()
    slow = "--slow" in sys.argv
    bodies = _bodies(requests, SLOW_MODEL if slow else MODEL)
    client, previous = Client(), get_ledger()
    routes = override_settings(ROOT_URLCONF="tests.benchmarks.ungated")
    upstream = None
    if slow:
        import tests.support.fake_upstream as fake_upstream

        fake_upstream.LATENCY = SLOW_LATENCY
        upstream = fake_upstream.UpstreamServer().start()
        routes = override_settings(
            ROOT_URLCONF="tests.benchmarks.ungated",
            LLM_QUOTA={**settings.LLM_QUOTA, "UPSTREAM": None, "OPENAI_BASE_URL": upstream.url,
                       "OPENAI_API_KEY": "bench"},
        )  # fmt: skip
    routes.enable()  # before the ledger: a changed LLM_QUOTA resets the default one
    ledger = Ledger(get_redis_connection("default"), prefix=f"prof{uuid.uuid4().hex[:8]}",
                    restore=previous.restore_source)  # fmt: skip
    set_default_ledger(ledger)

    def one_pass(path: str) -> float:
        return in_process_pass(client, path, bodies, tokens)

    try:
        for path in (GATED, UNGATED):
            one_pass(path)  # warm: imports, encodings, scripts, caches
        samples: dict[str, list[float]] = {GATED: [], UNGATED: []}
        for _ in range(5):
            for path in (GATED, UNGATED):
                samples[path].append(one_pass(path))
        on, off = (statistics.median(samples[p]) for p in (GATED, UNGATED))
        print(f"per request, {requests} requests x 5 passes (median), no timers:")
        added = f"{(on - off) * 1e3:.3f} ms ({on / off - 1:+.0%})"
        print(f"  gate off {off * 1e3:.3f} ms, gate on {on * 1e3:.3f} ms, "
              f"the gate's own cost {added}")  # fmt: skip
        for path in (GATED, UNGATED):
            print(f"  {path} passes: {[round(s * 1e3, 3) for s in samples[path]]} ms")
        for path in (UNGATED, GATED, UNGATED, GATED):
            timers = Timers()
            timers.install()
            try:
                whole = one_pass(path)
            finally:
                timers.remove()
            print(f"\n{path}: ms per request with timers ({whole * 1e3:.3f} ms in all)")
            for label, _target in PARTS:
                if timers.calls[label]:
                    print(f"  {label:<38} {timers.total[label] / requests * 1e3:7.3f} ms  "
                          f"({timers.calls[label] / requests:.1f} calls)")  # fmt: skip
        if "-v" in sys.argv:
            profiler = cProfile.Profile()
            profiler.enable()
            one_pass(GATED)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(80)
    finally:
        routes.disable()
        set_default_ledger(previous)
        _cleanup(ledger.keyspace.prefix)
        if upstream is not None:
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("-")]))
