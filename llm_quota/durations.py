"""Durations as a person reads them: "2 hours, 5 minutes", not "7500 s".

One humanizer for the refusal messages (``exceptions``) and the admin, so both say a
wait the same way. Plain English without Django's translation machinery, so it sits
below every layer (``exceptions`` is the bottom one) and reads the same in a log line.
"""

from __future__ import annotations

import math

#: The units shown, largest first. Months and weeks are left out on purpose: a month
#: has no fixed length, and "2 weeks, 3 days" reads worse than "17 days".
UNITS = (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1))


def human_duration(seconds: float, *, depth: int = 2) -> str:
    """``seconds`` in at most ``depth`` units, largest first: ``"1 day, 3 hours"``.

    The smallest unit shown is rounded up, never down: whoever waits the time the text
    says ("Retry after 2 hours, 6 minutes") is never early. Negative is ``"0 seconds"``.
    """
    total = math.ceil(max(0.0, seconds))
    if total == 0:
        return "0 seconds"
    first = next(i for i, (_, size) in enumerate(UNITS) if total >= size)
    smallest = UNITS[min(first + depth, len(UNITS)) - 1][1]
    total = -(-total // smallest) * smallest  # up to a whole smallest unit (may carry)
    parts = []
    for name, size in UNITS:
        if size < smallest:
            break
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count} {name}{'' if count == 1 else 's'}")
    return ", ".join(parts)
