"""A circuit breaker in front of Redis.

Once a Redis call fails, every request would otherwise pay a connect or read timeout
before failing open or closed. The breaker remembers the failure: for ``cooldown``
seconds no request touches Redis, then exactly one request per process probes it; a
success closes the breaker, a failure opens it for another cooldown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(self, cooldown: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.opened_at = 0.0
        self.failures = 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May this request call Redis? At most one probe at a time while half-open."""
        if self.state == CLOSED:
            return True
        with self._lock:
            if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown:
                self.state = HALF_OPEN
                return True  # this caller is the probe
            return False

    def success(self) -> bool:
        """Record a working call; True if this closed an open breaker (a recovery)."""
        if self.state == CLOSED:
            return False
        with self._lock:
            recovered = self.state != CLOSED
            self.state, self.failures = CLOSED, 0
            return recovered

    def failure(self) -> bool:
        """Record a failed call; True if this opened a closed breaker (a new outage)."""
        with self._lock:
            new_outage = self.state == CLOSED
            self.state, self.opened_at = OPEN, self.clock()
            self.failures += 1
            return new_outage

    @property
    def retry_after(self) -> float:
        """Seconds until the next probe may run."""
        if self.state == CLOSED:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))
