"""``manage.py llm_quota_runaway``: replay the incident this project exists for.

A worker with a bug calls the LLM in a loop, as fast as it can, with the official
``openai`` SDK and its default retries (it honours ``Retry-After`` on rate limits, as
a real worker would). Without a gate it spends until someone notices; through the
gateway it is stopped at its budget, told not to retry (``insufficient_quota``,
``x-should-retry: false``), and has spent no more than the budget.

By default a fresh service account on the ``--tier`` tier gets a daily budget of
``--budget`` base tokens and no request-rate limit (a batch worker), and the
project is served in-process on a free loopback port, so the replay needs no
running server; ``--base-url`` points it at one (``make demo``) instead. The loop is
bounded (``--max-requests``, ``--max-seconds``).

``--report`` replays the incident as the burn-rate breaker sees it (contract §11):
a synthetic week of ordinary heavy use, then the loop, on the ledger with a simulated
clock (``llm_quota.testing.traffic``), once without the breaker and once with the
``--tier`` tier's settings. It prints how long each took to stop the loop and how much
of the daily budget was spent by then. It writes under a key prefix of its own and
deletes it afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from llm_quota.conf import quota_settings
from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.management.progress import progress
from llm_quota.models import Tier, UserQuota
from llm_quota.rules.accounting import Limits
from llm_quota.rules.pricing import price_for
from llm_quota.testing import traffic

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You summarise support tickets in one paragraph."},
    {"role": "user", "content": "Ticket #4127: the nightly export job retries forever."},
]


def serve_in_process() -> tuple[str, Any]:
    """This project's WSGI app on a free loopback port, in a daemon thread."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler, allow_reuse_address=False)
    server.set_app(WSGIHandler())
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server


class Command(BaseCommand):
    help = "Replay a runaway worker loop against the gateway and show where the gate stops it."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--model", default="gpt-4o")
        parser.add_argument("--budget", type=int, default=20_000, help="base tokens per day")
        parser.add_argument("--tier", default="pro", help="the worker's tier (default: pro)")
        parser.add_argument("--username", help="reuse this account (default: a fresh one)")
        parser.add_argument("--base-url", help="a running gateway, e.g. http://127.0.0.1:8000/v1")
        parser.add_argument("--max-tokens", type=int, default=256)
        parser.add_argument("--max-requests", type=int, default=100_000)
        parser.add_argument("--max-seconds", type=float, default=300.0)
        parser.add_argument(
            "--report",
            action="store_true",
            help="replay a synthetic week and the loop on a simulated clock, "
            "without and with the burn-rate breaker, and compare",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
            raise CommandError("The replay drives the official SDK: pip install openai") from exc
        if opts["report"]:
            self._breaker_report(opts["tier"])
            return
        if opts["budget"] < 1:
            raise CommandError("--budget must be a positive number of base tokens.")
        price = price_for(opts["model"])
        user = self._worker(opts)
        token = str(ScopedTokenObtainPairSerializer.get_token(user).access_token)
        server = None
        base_url = opts["base_url"]
        if not base_url:
            base_url, server = serve_in_process()
        usd = Decimal(str(quota_settings.BASE_TOKEN_USD_PER_MILLION)) / 1_000_000
        budget = opts["budget"]
        ledger = get_ledger()
        start_spent = ledger.usage(user.pk).tokens_today
        self.stdout.write(
            f"Worker '{user.username}' calls {opts['model']} through {base_url} in a loop, "
            f"as fast as it can.\nBudget: {budget:,} base tokens a day "
            f"(${budget * usd:.4f}); already spent today: {start_spent:,}.\n"
        )
        client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=2)
        bar = progress(budget, desc="Spent (base tokens)", unit="tok", file=self.stderr)
        requests, refusal, started = 0, None, time.monotonic()
        try:
            while requests < opts["max_requests"]:
                if time.monotonic() - started > opts["max_seconds"]:
                    break
                try:
                    reply = client.chat.completions.create(
                        model=opts["model"], messages=PROMPT, max_tokens=opts["max_tokens"]
                    )
                except openai.RateLimitError as exc:
                    refusal = exc
                    break
                requests += 1
                usage = reply.usage
                if usage is None:
                    raise CommandError("The gateway answered without a usage.")
                spent = price.base_tokens(usage.prompt_tokens, usage.completion_tokens)
                bar.update(spent)
        finally:
            bar.close()
            client.close()
            if server is not None:
                server.shutdown()
                server.server_close()
        elapsed = time.monotonic() - started
        self._report(user, requests, elapsed, refusal, budget, start_spent, usd, ledger)

    def _worker(self, opts: dict[str, Any]) -> Any:
        tier = Tier.objects.filter(name=opts["tier"]).first()
        if tier is None:
            raise CommandError(f"No tier {opts['tier']!r}; run manage.py demo_seed first.")
        User = get_user_model()
        username = opts["username"] or time.strftime("runaway-%Y%m%d-%H%M%S")
        user = User.objects.filter(username=username).first()
        if user is None:
            user = User.objects.create_user(username)  # unusable password: a service account
        UserQuota.objects.update_or_create(
            user=user,
            defaults={
                "tier": tier,
                "tokens_per_day": opts["budget"],
                # A batch worker: no request-rate limit, so only the budget can stop it.
                "requests_per_minute": 10**9,
                "tokens_per_minute": 10**12,
            },
        )
        return user

    def _report(self, user, requests, elapsed, refusal, budget, start_spent, usd, ledger) -> None:
        usage = ledger.usage(user.pk)
        spent = usage.tokens_today - start_spent
        rate = requests / elapsed if elapsed else 0.0
        out = self.stdout.write
        out(f"\n{requests:,} requests in {elapsed:.1f} s ({rate:,.0f} requests/s).")
        if refusal is None:
            out(self.style.WARNING("The loop hit --max-requests/--max-seconds before its budget."))
        else:
            error = (refusal.body or {}) if isinstance(refusal.body, dict) else {}
            headers = refusal.response.headers
            out(
                self.style.ERROR(
                    f"Stopped by the gate: HTTP 429 {error.get('code')} "
                    f"(limit {error.get('limit')}), Retry-After {headers.get('retry-after')} s, "
                    f"x-should-retry: {headers.get('x-should-retry')}."
                )
            )
            out(f'  "{error.get("message")}"')
        out(
            f"Spent {spent:,} of a {budget:,} base-token budget ({100 * spent / budget:.1f}%), "
            f"${spent * usd:.4f} of ${budget * usd:.4f}; still reserved: {usage.reserved}."
        )
        if spent > budget - start_spent and start_spent < budget:
            raise CommandError("The worker spent more than its budget.")
        if refusal is not None and rate:
            per_day = rate * 86_400 * (spent / max(requests, 1))
            out(
                f"Unstopped at this pace it would have spent {per_day:,.0f} base tokens a day "
                f"(${per_day * float(usd):,.2f})."
            )

    def _breaker_report(self, tier_name: str) -> None:
        tier = Tier.objects.filter(name=tier_name).first()
        source = tier_name if tier else "the defaults"
        # A tier that does not exist: the breaker's defaults (a new tier's).
        tier = tier or Tier(name=tier_name)
        settings = {
            name: getattr(tier, name)
            for name in ("burn_multiplier", "burn_floor", "burn_pause_seconds")
        }
        if None in settings.values():
            raise CommandError(f"The breaker is off on the tier {tier_name!r}.")
        budget = traffic.DAILY_BUDGET
        breaker = Limits(
            tokens_per_day=budget,
            burn_multiplier=float(settings["burn_multiplier"]),
            burn_floor=int(settings["burn_floor"]),
            burn_pause=int(settings["burn_pause_seconds"]),
        )
        out = self.stdout.write
        out(
            f"The incident, replayed on the ledger with a simulated clock: a synthetic week "
            f"of ordinary heavy use (seed 15: {len(traffic.synthetic_week()):,} calls), then "
            f"a loop of {traffic.LOOP_PACE} calls a second.\nDaily budget: {budget:,} base "
            f"tokens. Breaker ({source}): "
            f"{float(settings['burn_multiplier']):g}x the baseline, floor "
            f"{settings['burn_floor']:,} base tokens a minute, pause "
            f"{settings['burn_pause_seconds']} s.\n"
        )
        rows = [
            ("without the breaker", self._replay(Limits(tokens_per_day=budget))),
            ("with the breaker", self._replay(breaker)),
        ]
        out(f"{'':22}{'false trips':>13}{'stopped after':>16}  {'by':<20}{'spent by then':>22}")
        for name, incident in rows:
            loop, stop = incident.loop, incident.seconds_to_stop
            by = loop.first_refusal[1] if loop.first_refusal else "nothing"
            out(
                f"{name:22}{len(incident.week.trips):>13}"
                f"{'-' if stop is None else f'{stop:.1f} s':>16}  {by:<20}"
                f"{loop.spent:>12,} ({100 * loop.spent / budget:5.1f}%)"
            )

    def _replay(self, limits: Limits) -> traffic.Incident:
        ledger = get_ledger()
        prefix = f"{ledger.keyspace.prefix}-replay-{uuid.uuid4().hex[:8]}"
        clock = traffic.pinned_clock(traffic.REPLAY_MONDAY)
        replayer = Ledger(ledger.client, prefix=prefix, clock=clock)
        try:
            return traffic.replay_incident(replayer, clock, "runaway", limits)
        finally:
            for batch in _batches(ledger.client.scan_iter(match=f"{prefix}:*", count=500)):
                ledger.client.delete(*batch)


def _batches(items: Any, size: int = 500) -> Any:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
