"""Signals for host projects: alerting, billing hooks, audit logs."""

from django.dispatch import Signal

#: Sent when a request is refused. kwargs: user, limit, retry_after, error_type, and
#: the payers beside the user: api_key_id and team_id (None when there is none).
quota_refused = Signal()

#: Sent once per user, period and threshold when the month's settled usage crosses
#: the tier's soft limit (``soft_limit_percent`` of ``tokens_per_month``).
#: kwargs: user_id, limit, used, threshold (base tokens), percent, budget, period,
#: event (the same fields as the webhook's JSON body).
soft_limit_crossed = Signal()

#: Sent once per user, limit and period when a day, month or global budget first
#: refuses a request (``quota_refused`` fires on every refusal).
#: An API key's own budget alerts its owner the same way, once per key (limit
#: "key.tokens_per_day" or "key.tokens_per_month", with api_key_id).
#: kwargs: user_id, limit, percent (100), period, retry_after, event (api_key_id).
budget_exhausted = Signal()

#: Sent once per team, limit and period when the team's day or month budget first
#: refuses a request (``quota_refused`` fires on every refusal). kwargs: team (slug),
#: team_id, admins (user ids of the team's admins), limit ("team.tokens_per_day" or
#: "team.tokens_per_month"), percent (100), period, retry_after, event.
team_budget_exhausted = Signal()

#: Sent once per team, month and threshold when the team's settled usage crosses its
#: tier's soft limit. kwargs: team (slug), team_id, admins (user ids of the team's
#: admins), limit ("team.tokens_per_month"), used, threshold, percent, budget, period,
#: event (the same fields as the webhook's JSON body).
team_soft_limit_crossed = Signal()

#: Sent when a settled call used more than was reserved for it (an upstream that
#: ignored the output cap, or billed a prompt above its estimate). It is charged in
#: full all the same, so a limit may be passed by this much.
#: kwargs: user_id, model, reservation_id, reserved and charged (base tokens),
#: input_tokens, output_tokens (as charged), max_tokens (the output cap reserved).
usage_overrun = Signal()

#: Sent once when the burn-rate breaker pauses a caller (contract §11): its last
#: minute's spend jumped far above its own baseline. kwargs: user_id, tier,
#: paused_seconds, limit (``burn_rate_exceeded``, or ``key.``/``team.`` before it), and
#: ``api_key_id`` for a key's breaker or ``team`` for a team's (the payer paused; the
#: user is the one whose request tripped it). ``quota_refused`` fires as well.
burn_rate_tripped = Signal()
