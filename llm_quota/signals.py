"""Signals for host projects: alerting, billing hooks, audit logs."""

from django.dispatch import Signal

#: Sent when a request is refused. kwargs: user, limit, retry_after, error_type.
quota_refused = Signal()

#: Sent once per user, period and threshold when usage crosses the tier's soft
#: limit. kwargs: user_id, limit, used, threshold, period.
soft_limit_crossed = Signal()
