"""A clock moved by hand, for the ledger's windows and periods."""

from __future__ import annotations

from datetime import datetime


class Clock:
    """Seconds since the epoch, moved by hand: windows and periods without sleep()."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, moment: datetime) -> None:
        self.now = moment.timestamp()
