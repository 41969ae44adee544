"""``TokenEndpointThrottle``: requests per client address to the token views (password
guessing), configured like any DRF throttle and counted atomically in Redis."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, ClassVar

from django.core.exceptions import ImproperlyConfigured
from django_redis import get_redis_connection
from redis.exceptions import RedisError
from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

from llm_quota.conf import quota_settings
from llm_quota.exceptions import QuotaUnavailable, RateLimited
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import Estimate, Limits, Price

logger = logging.getLogger("llm_quota")

#: An empty price: the reservation counts the request and no tokens.
_NOTHING = Estimate(Price("token-endpoint", 0, 0), 0, 0)


class TokenEndpointThrottle(SimpleRateThrottle):
    """The rate is DRF's: ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["llm_quota_token"]``
    (``"20/minute"`` when absent, ``None`` turns it off), or a ``rate`` on a subclass.

    The counting is not DRF's cached list, whose read-modify-write lets bursts through:
    it is the ledger's sliding request window, so the rate must be per minute. Each
    client address is a pseudo user in a key space of its own (``<KEY_PREFIX>-ip``),
    never mixed with real users' counters, snapshots or restores, and the reservation
    is released at once, so only the request is counted. Behind proxies, set DRF's
    ``NUM_PROXIES``; without it ``X-Forwarded-For`` is ignored, since any client can
    write it.
    """

    scope = "llm_quota_token"
    #: The rate when ``DEFAULT_THROTTLE_RATES`` has no entry for ``scope``.
    default_rate = "20/minute"

    _ledgers: ClassVar[dict[tuple[str, str], Ledger]] = {}
    # Set by SimpleRateThrottle.__init__ (parse_rate; None only when ``rate`` is); the
    # stubs don't declare them.
    num_requests: int
    duration: int

    def __init__(self) -> None:
        try:
            super().__init__()
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            raise ImproperlyConfigured(
                f"The token endpoint's throttle rate {self.rate!r} is not a DRF rate such "
                'as "20/minute".'
            ) from exc
        if self.rate is not None and (self.duration != 60 or self.num_requests < 1):
            raise ImproperlyConfigured(
                f"The token endpoint's throttle rate {self.rate!r} must be requests per "
                'minute, at least 1, such as "20/minute" (it is counted in a sliding '
                "minute in Redis); None turns it off."
            )

    def get_rate(self) -> str | None:
        """``DEFAULT_THROTTLE_RATES[scope]``, read now (DRF's class attribute is read once,
        at import). The deprecated ``LLM_QUOTA["TOKEN_REQUESTS_PER_MINUTE"]`` wins while
        it is set."""
        if quota_settings.is_set("TOKEN_REQUESTS_PER_MINUTE"):
            legacy = quota_settings.TOKEN_REQUESTS_PER_MINUTE
            return f"{legacy}/minute" if legacy else None
        # The stubs type the rates as numbers; DRF reads strings ("20/minute").
        rates: dict[str, str | None] = api_settings.DEFAULT_THROTTLE_RATES  # type: ignore[assignment]
        return rates.get(self.scope, self.default_rate)

    def get_ident(self, request: Any) -> str:
        if api_settings.NUM_PROXIES is None:
            return request.META.get("REMOTE_ADDR") or ""
        return super().get_ident(request)

    def ledger(self) -> Ledger:
        key = (quota_settings.REDIS_CACHE_ALIAS, quota_settings.KEY_PREFIX)
        if key not in self._ledgers:
            self._ledgers[key] = Ledger(
                get_redis_connection(quota_settings.REDIS_CACHE_ALIAS),
                prefix=f"{quota_settings.KEY_PREFIX}-ip"[:32],
                reservation_ttl=60,
            )
        return self._ledgers[key]

    def allow_request(self, request: Any, view: Any) -> bool:
        """Count the request, or raise ``RateLimited`` with its ``Retry-After``."""
        if self.rate is None:
            return True
        # A digest: an address (v6, or whatever a proxy wrote) never shapes a key.
        pseudo_user = "ip-" + hashlib.sha256(self.get_ident(request).encode()).hexdigest()[:40]
        limits = Limits(requests_per_minute=self.num_requests)
        try:
            ledger = self.ledger()
            decision = ledger.reserve(pseudo_user, limits, _NOTHING)
            if decision.reservation is not None:
                ledger.release(decision.reservation)
        except RedisError as exc:
            if quota_settings.FAIL_OPEN:
                logger.critical("token throttle without Redis: %s", exc)
                return True
            raise QuotaUnavailable() from exc
        if not decision.allowed:
            raise RateLimited(decision.limit or "requests_per_minute", decision.retry_after_seconds)
        return True

    def wait(self) -> float | None:
        return None  # refusals are raised with their own Retry-After
