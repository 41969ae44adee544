"""Alerts: soft limit and budget signals, once per user, threshold and period; webhook."""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from celery.contrib.testing.worker import start_worker

from llm_quota.exceptions import BudgetExceeded
from llm_quota.quota import alerts
from llm_quota.quota.alerts import sent
from llm_quota.signals import budget_exhausted, quota_refused, soft_limit_crossed
from project.celery import app
from tests.support import factories, periods
from tests.support.spend import spend

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def setup(ledger, db):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    return factories.tier("free", tokens_per_month=1000, tokens_per_day=600, is_default=True)


@pytest.fixture
def received():
    events = {"soft": [], "budget": [], "refused": []}

    def soft(sender, **kw):
        events["soft"].append(kw)

    def budget(sender, **kw):
        events["budget"].append(kw)

    def refused(sender, **kw):
        events["refused"].append(kw)

    soft_limit_crossed.connect(soft)
    budget_exhausted.connect(budget)
    quota_refused.connect(refused)
    yield events
    soft_limit_crossed.disconnect(soft)
    budget_exhausted.disconnect(budget)
    quota_refused.disconnect(refused)
    sent.clear()


#: Calls here ask for at most 50 output tokens: the estimates below count on it.
use = partial(spend, max_tokens=50)


def test_soft_limit_signal_fires_once_when_the_month_crosses_it(setup, received, clock):
    periods.keep_room(clock, days=3)
    user = factories.user()
    use(user, 300, 50)  # 500
    clock.advance(86400)  # one request a day: the day budget is not what we test here
    use(user, 200, 0)  # 700 < 800
    assert received["soft"] == []
    clock.advance(86400)
    use(user, 150, 0)  # 850: crossed
    clock.advance(86400)
    use(user, 50, 0)  # 900: still above, no repeat
    assert len(received["soft"]) == 1
    alert = received["soft"][0]
    assert alert["user_id"] == str(user.pk) and alert["period"] == periods.month_id(clock)
    assert (alert["limit"], alert["percent"], alert["threshold"], alert["used"]) == (
        "tokens_per_month", 80, 800, 850,
    )  # fmt: skip
    assert alert["event"]["event"] == "soft_limit_crossed"


def test_budget_alert_fires_once_per_period_while_every_refusal_is_signalled(
    setup, received, clock
):
    periods.keep_room(clock, days=1)
    first_day, month = periods.day_id(clock), periods.month_id(clock)
    user = factories.user()
    use(user, 400, 50)  # 600: today's budget is spent
    for _ in range(3):
        with pytest.raises(BudgetExceeded):
            use(user, 10, 0)
    assert len(received["refused"]) == 3
    assert [(a["limit"], a["period"]) for a in received["budget"]] == [
        ("tokens_per_day", first_day)
    ]
    clock.advance(86400)
    use(user, 300, 0)  # 900 this month; the month budget refuses next
    with pytest.raises(BudgetExceeded):
        use(user, 100, 0)
    with pytest.raises(BudgetExceeded):
        use(user, 100, 0)
    assert [(a["limit"], a["period"]) for a in received["budget"]] == [
        ("tokens_per_day", first_day),
        ("tokens_per_month", month),
    ]


def test_many_threads_crossing_together_send_one_alert(setup, received, settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "CONFIG_CACHE_SECONDS": 600}
    tier = setup
    tier.tokens_per_day = None
    tier.save()
    user = factories.user()
    use(user, 10, 0)  # warms the policy cache: the threads need no database
    barrier = threading.Barrier(16)

    def burst():
        barrier.wait()
        for _ in range(5):
            use(user, 10, 0, max_tokens=1)

    threads = [threading.Thread(target=burst) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 10 + 16 x 5 x 10 = 810: over 800 exactly once.
    assert len(received["soft"]) == 1


def test_settling_below_the_soft_limit_costs_no_extra_round_trip(setup, ledger, redis_client):
    user = factories.user()
    use(user, 10, 0)  # loads the scripts and restores the (empty) month
    sent_commands = []
    conn = redis_client.connection_pool.get_connection()
    redis_client.connection_pool.release(conn)
    original = type(conn).send_packed_command

    def counting(self, command, check_health=True):
        sent_commands.append(command)
        return original(self, command, check_health)

    type(conn).send_packed_command = counting
    try:
        use(user, 10, 0)
    finally:
        type(conn).send_packed_command = original
    assert len(sent_commands) == 2  # reserve, settle


class _Receiver(BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers["Content-Length"])
        self.bodies.append((self.headers["Content-Type"], json.loads(self.rfile.read(length))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.django_db(transaction=True)
def test_webhook_receives_the_alert_as_json_from_a_celery_worker(ledger, received, settings):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_month=1000, soft_limit_percent=50, is_default=True)
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.bodies = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA,
        "ALERT_WEBHOOK_URL": f"http://127.0.0.1:{server.server_port}/hook",
    }
    user = factories.user()
    try:
        with start_worker(app, pool="solo", perform_ping_check=False):
            use(user, 600, 0)  # 600 >= 500: crossed; the POST happens on the worker
            alerts.flush_webhooks(timeout=30)
            for _ in range(100):
                if _Receiver.bodies:
                    break
                threading.Event().wait(0.1)
    finally:
        server.shutdown()
    assert len(_Receiver.bodies) == 1
    content_type, body = _Receiver.bodies[0]
    assert content_type == "application/json"
    assert body == received["soft"][0]["event"]
    assert (body["event"], body["user_id"], body["used"], body["threshold"]) == (
        "soft_limit_crossed", str(user.pk), 600, 500,
    )  # fmt: skip


def test_the_request_never_waits_for_the_broker_nor_fails_with_it(
    setup, received, settings, monkeypatch, caplog
):
    """Publishing is handed to a background thread: here it blocks until the request
    is over, then fails as an unreachable broker does; the request saw neither."""
    from celery import current_app
    from kombu.exceptions import OperationalError

    from llm_quota.quota import alerts

    setup.tokens_per_day = None
    setup.save()
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "ALERT_WEBHOOK_URL": "http://127.0.0.1:9/x"}
    request_done = threading.Event()

    def unreachable_broker(*args, **kwargs):
        assert request_done.wait(timeout=30)
        raise OperationalError("Error 111 connecting to 127.0.0.1:9. Connection refused.")

    monkeypatch.setattr(current_app, "send_task", unreachable_broker)
    user = factories.user()
    settlement = use(user, 900, 0)  # crosses 800 while the publish is still blocked
    request_done.set()
    alerts.flush_webhooks(timeout=30)
    assert settlement.settled and len(received["soft"]) == 1
    assert "could not queue the alert webhook" in caplog.text


def test_alert_settings_are_checked(settings):
    from llm_quota.checks import check_settings

    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA, "ALERT_WEBHOOK_URL": "ftp://x", "ALERT_WEBHOOK_TIMEOUT": 0,
    }  # fmt: skip
    assert {e.id for e in check_settings()} >= {"llm_quota.E020", "llm_quota.E021"}
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "ALERT_WEBHOOK_URL": "https://hooks.example/x",
                          "ALERT_WEBHOOK_TIMEOUT": 2.5}  # fmt: skip
    assert not {e.id for e in check_settings()} & {"llm_quota.E020", "llm_quota.E021"}
