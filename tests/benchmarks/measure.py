"""Timing and table helpers shared by the benchmark sections."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RUNS = 5


def per_call(fn: Callable[[], object], calls: int, runs: int = RUNS) -> float:
    """Median over ``runs`` of the mean seconds per call of ``fn``."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def median_of(fn: Callable[[], float], runs: int = RUNS) -> float:
    return statistics.median(fn() for _ in range(runs))


@dataclass
class Table:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, section: str, what: str, value: str, goal: str = "") -> None:
        self.rows.append((section, what, value, goal))
        print(f"  {section:<22} {what:<58} {value:>22}  {goal}", flush=True)

    def markdown(self) -> str:
        lines = ["| section | measure | value | goal |", "|---|---|---|---|"]
        lines += [f"| {s} | {w} | {v} | {g} |" for s, w, v, g in self.rows]
        return "\n".join(lines)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"
