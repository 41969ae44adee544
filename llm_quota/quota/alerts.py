"""Alerts: the soft-limit and budget signals, sent once per user, limit, threshold
and period, and optionally POSTed to ``ALERT_WEBHOOK_URL``.

Crossing the soft limit is seen without an extra Redis round trip: ``settle.lua``
returns the month's settled total, and exactly one settle moves it from below the
threshold to at or above it (the increment is atomic). Only that settle pays for
the ``SET NX`` dedupe marker, which also keeps a retried or restored settle from
alerting twice. A budget refusal checks the marker once per process (a local memo
remembers markers already set), so a client hammering a closed budget costs no
extra round trips after its first refusal.

Nothing here may fail a request: errors are logged, the request goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from celery import current_app
from django.contrib.auth import get_user_model
from django.dispatch import Signal

from llm_quota import signals
from llm_quota.conf import quota_settings
from llm_quota.ledger import keys
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import Reservation, Settlement
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import runaway

logger = logging.getLogger("llm_quota")

#: The Celery task that POSTs an alert (``tasks.post_alert_webhook``).
WEBHOOK_TASK = "llm_quota.post_alert_webhook"

#: Budget refusals that alert, and the period each one is counted in.
BUDGET_PERIODS = {
    "tokens_per_day": "day",
    "tokens_per_month": "month",
    "global_tokens_per_day": "day",
    "global_tokens_per_month": "month",
}
#: The same for the payers beside the user: an API key's budgets alert its owner,
#: a team's its admins.
PAYER_BUDGET_PERIODS = {
    f"{payer}.{limit}": period
    for payer in ("key", "team")
    for limit, period in (("tokens_per_day", "day"), ("tokens_per_month", "month"))
}
DAY_MARKER_TTL = 2 * 86400
MONTH_MARKER_TTL = 40 * 86400


class _SentMemo:
    """Markers this process already knows are set; bounded, and forgetful by design."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self.keys: dict[str, float] = {}
        self.lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        expiry = self.keys.get(key)
        return expiry is not None and expiry > time.monotonic()

    def add(self, key: str, ttl: float) -> None:
        with self.lock:
            if len(self.keys) >= self.size:
                self.keys.clear()
            self.keys[key] = time.monotonic() + ttl

    def clear(self) -> None:
        with self.lock:
            self.keys.clear()


sent = _SentMemo()


def _user_pk(uid: str) -> Any:
    return get_user_model()._meta.pk.to_python(uid)


def _send_once(
    ledger: Ledger,
    signal: Signal,
    sender: Any,
    event: dict[str, Any],
    ttl: int,
    key: str | None = None,
) -> bool:
    if key is None:
        key = ledger.keyspace.alert_sent(
            event["user_id"], event["limit"], event["percent"], event["period"]
        )
    if not _claim(ledger, key, event["at"], ttl):
        return False
    _emit(signal, sender, event)
    return True


def _claim(ledger: Ledger, key: str, at: str, ttl: int) -> bool:
    """True for the one caller, in any process, that sets the dedupe marker ``key``."""
    if key in sent:
        return False
    first = ledger.client.set(key, at, nx=True, ex=ttl)
    sent.add(key, ttl)
    return bool(first)


def _emit(signal: Signal, sender: Any, event: dict[str, Any]) -> None:
    signal.send(sender=sender, event=event, **{k: v for k, v in event.items() if k != "event"})
    deliver_webhook(event)


# One background thread hands webhooks to Celery: publishing is a broker round trip,
# and an unreachable broker makes kombu retry for seconds. Alerts are rare (once
# per user and period), so one thread, in order, is plenty.
_outbox = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-quota-alerts")


def deliver_webhook(event: dict[str, Any]) -> Future[None] | None:
    """POST ``event`` to ``ALERT_WEBHOOK_URL`` via a Celery task, off the request path.

    The task retries network errors and 5xx with backoff; the request only hands
    the event to an in-process queue and never waits for the broker or receiver.
    """
    if not quota_settings.ALERT_WEBHOOK_URL:
        return None
    return _outbox.submit(_publish, event)


def _publish(event: dict[str, Any]) -> None:
    try:
        # By name: the task lives in ``tasks.py``, a layer above this one.
        current_app.send_task(WEBHOOK_TASK, (event,), retry=False, ignore_result=True)
    except Exception:  # the broker is down: the signal was sent, the webhook is lost
        logger.exception("could not queue the alert webhook for %s", event["event"])


def flush_webhooks(timeout: float | None = None) -> None:
    """Wait until every webhook handed over so far has been published (or failed)."""
    _outbox.submit(lambda: None).result(timeout=timeout)


def _now_iso(ledger: Ledger) -> str:
    moment = ledger.clock() if ledger.clock is not None else time.time()
    return datetime.fromtimestamp(moment, UTC).isoformat()


def soft_limit_crossing(policy: Any, settlement: Settlement) -> tuple[int, int, int] | None:
    """``(budget, percent, threshold)`` if this settle took the month over the soft
    limit, else None. Pure: async callers check it on the loop, and leave it only for
    the rare settle that must send an alert."""
    if not settlement.settled or settlement.month_used is None:
        return None
    budget = policy.limits.tokens_per_month
    if budget is None:
        return None
    percent = int(policy.soft_limit_percent)
    threshold = math.ceil(budget * percent / 100)
    used = settlement.month_used
    if not used - settlement.base_tokens < threshold <= used:
        return None
    return budget, percent, threshold


def team_soft_limit_crossing(team: Any, settlement: Settlement) -> tuple[int, int, int] | None:
    """``(budget, percent, threshold)`` if this settle took the paying team's month over
    its soft limit, else None. Pure, like ``soft_limit_crossing``."""
    used = settlement.team_month_used
    if team is None or not settlement.settled or used is None or team.tokens_per_month is None:
        return None
    percent = int(team.soft_limit_percent)
    threshold = math.ceil(team.tokens_per_month * percent / 100)
    if not used - settlement.base_tokens < threshold <= used:
        return None
    return team.tokens_per_month, percent, threshold


def after_team_settle(
    reservation: Reservation, settlement: Settlement, ledger: Ledger | None = None
) -> None:
    """Send ``team_soft_limit_crossed`` to the team's admins (signal and webhook) if
    this settle took the team's month over its soft limit."""
    try:
        from llm_quota.rules.teams import team_policy

        ledger = ledger or get_ledger()
        team = team_policy(int(reservation.team)) if reservation.team else None
        crossing = team_soft_limit_crossing(team, settlement)
        if team is None or crossing is None:
            return
        budget, percent, threshold = crossing
        event = {
            "event": "team_soft_limit_crossed",
            "team": team.slug,
            "team_id": team.id,
            "admins": _team_admins(team.id),
            "limit": "team.tokens_per_month",
            "percent": percent,
            "threshold": threshold,
            "budget": budget,
            "used": settlement.team_month_used,
            "period": settlement.month,
            "at": _now_iso(ledger),
        }
        key = ledger.keyspace.team_alert_sent(team.id, threshold, settlement.month)
        _send_once(
            ledger, signals.team_soft_limit_crossed, Settlement, event, MONTH_MARKER_TTL, key
        )
    except Exception:
        logger.exception("team soft-limit alert failed for team %s", reservation.team)


def _team_admins(team_id: int) -> list[str]:
    """The user ids of a team's admins, whom its alerts name."""
    from llm_quota.models import TeamMembership

    admins = TeamMembership.objects.filter(team_id=team_id, role=TeamMembership.ADMIN)
    return [str(pk) for pk in admins.values_list("user_id", flat=True)]


def user_pk(uid: str) -> Any:
    return _user_pk(uid)


def after_settle(
    reservation: Reservation, settlement: Settlement, ledger: Ledger | None = None
) -> None:
    """Send ``soft_limit_crossed`` if this settle took the month over the soft limit."""
    if not settlement.settled or settlement.month_used is None:
        return
    try:
        ledger = ledger or get_ledger()
        from llm_quota.rules.policy import policy_for

        policy = policy_for(_user_pk(reservation.user_id))
        crossing = soft_limit_crossing(policy, settlement)
        if crossing is None:
            return
        budget, percent, threshold = crossing
        used = settlement.month_used
        event = {
            "event": "soft_limit_crossed",
            "user_id": reservation.user_id,
            "limit": "tokens_per_month",
            "percent": percent,
            "threshold": threshold,
            "budget": budget,
            "used": used,
            "period": settlement.month,
            "at": _now_iso(ledger),
        }
        _send_once(ledger, signals.soft_limit_crossed, Settlement, event, MONTH_MARKER_TTL)
    except Exception:
        logger.exception("soft-limit alert failed for user %s", reservation.user_id)


def on_quota_refused(
    sender: Any,
    user: Any = None,
    limit: str | None = None,
    retry_after: int = 0,
    api_key_id: str | None = None,
    team_id: str | None = None,
    **kwargs: Any,
) -> None:
    """Receiver of ``quota_refused``: the first refusal by a budget in a period alerts
    (a user's or the global caps' to the user, a key's to its owner, a team's to its
    admins)."""
    if (limit or "").startswith("team.") and team_id is not None:
        _team_budget_exhausted(sender, limit or "", retry_after, team_id)
        return
    kind = BUDGET_PERIODS.get(limit or "")
    if kind is None and api_key_id is not None:
        kind = PAYER_BUDGET_PERIODS.get(limit or "")
    if kind is None or user is None:
        return
    try:
        uid = keys.user_id(getattr(user, "pk", user))
        ledger = get_ledger()
        # The local clock names the period: no Redis round trip for it.
        moment = ledger.clock() if ledger.clock is not None else time.time()
        day, month = ledger.periods(int(moment * 1000))
        event = {
            "event": "budget_exhausted",
            "user_id": uid,
            "limit": limit,
            "percent": 100,
            "period": day if kind == "day" else month,
            "retry_after": int(retry_after),
            "at": _now_iso(ledger),
        }
        marker = None
        if limit in PAYER_BUDGET_PERIODS:  # one alert per key, not per user
            key_id = keys.api_key_id(api_key_id)
            event["api_key_id"] = key_id
            part = f"key_{key_id}_{(limit or '').removeprefix('key.')}"
            marker = ledger.keyspace.alert_sent(uid, part, 100, day if kind == "day" else month)
        ttl = DAY_MARKER_TTL if kind == "day" else MONTH_MARKER_TTL
        _send_once(ledger, signals.budget_exhausted, sender, event, ttl, marker)
    except Exception:
        logger.exception("budget alert failed for %s", limit)


def _team_budget_exhausted(sender: Any, limit: str, retry_after: int, team_id: str) -> None:
    """Send ``team_budget_exhausted`` to the team's admins (signal and webhook) on the
    first refusal by the team's day or month budget in that period, as a user's budget
    alerts the user. The admins are read only by the one caller that sends it."""
    kind = PAYER_BUDGET_PERIODS.get(limit)
    if kind is None:
        return
    try:
        from llm_quota.rules.teams import team_policy

        ledger = get_ledger()
        moment = ledger.clock() if ledger.clock is not None else time.time()
        day, month = ledger.periods(int(moment * 1000))
        period = day if kind == "day" else month
        at = _now_iso(ledger)
        ttl = DAY_MARKER_TTL if kind == "day" else MONTH_MARKER_TTL
        part = limit.removeprefix("team.")
        marker = ledger.keyspace.team_budget_alert_sent(team_id, part, period)
        if not _claim(ledger, marker, at, ttl):
            return
        team = team_policy(int(team_id))
        if team is None:
            return
        event = {
            "event": "team_budget_exhausted",
            "team": team.slug,
            "team_id": team.id,
            "admins": _team_admins(team.id),
            "limit": limit,
            "percent": 100,
            "period": period,
            "retry_after": int(retry_after),
            "at": at,
        }
        _emit(signals.team_budget_exhausted, sender, event)
    except Exception:
        logger.exception("team budget alert failed for team %s", team_id)


def on_burn_rate_tripped(
    sender: Any,
    user_id: str = "",
    tier: str | None = None,
    paused_seconds: int = 0,
    limit: str = "burn_rate_exceeded",
    **kwargs: Any,
) -> None:
    """Receiver of ``burn_rate_tripped``: lists the user, the key or the team whose
    breaker it was as paused (the admin's filters), and posts the alert webhook, naming
    the key or the team when it was theirs. Every trip posts: a trip pauses the
    caller, so trips come a pause apart at the least."""
    try:
        ledger = get_ledger()
        payer = {name: kwargs[name] for name in ("api_key_id", "team") if name in kwargs}
        if limit == "key.burn_rate_exceeded" and "api_key_id" in payer:
            runaway.list_paused(ledger, payer["api_key_id"], paused_seconds, "key")
        elif limit == "team.burn_rate_exceeded" and "team" in payer:
            runaway.list_paused(ledger, payer["team"], paused_seconds, "team")
        elif limit == "burn_rate_exceeded":
            runaway.list_paused(ledger, user_id, paused_seconds)
        deliver_webhook(
            {
                "event": "burn_rate_tripped",
                "user_id": user_id,
                **payer,
                "tier": tier,
                "limit": limit,
                "paused_seconds": int(paused_seconds),
                "at": _now_iso(ledger),
            }
        )
    except Exception:
        logger.exception("burn-rate alert failed for user %s", user_id)
