"""``make bench``: what the gate costs, measured against baselines in the same run.

Every figure is the median of several runs; every comparison is a ratio to a baseline
measured in the same process a moment before (a bare PING, DRF's throttle), never a
fixed number of microseconds, so the table means the same on any machine. Nothing
here is part of ``make test``.
"""
