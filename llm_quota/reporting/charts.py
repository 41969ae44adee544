"""Small server-side SVG charts for the admin's usage page.

Inline SVG needs no JavaScript, no CDN and no vendored library, renders in every
browser and in the admin's dark mode, and each bar carries a ``<title>`` tooltip
with its exact figure. Every label is escaped here; the result is marked safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

#: Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")

Formatter = Callable[[float], str]


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float]


def compact(value: float) -> str:
    """1234567 -> '1.2M': axis labels that fit."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            text = f"{value / limit:.1f}".rstrip("0").rstrip(".")
            return text + suffix
    return f"{value:g}"


def usd(value: float) -> str:
    """Cents, or four places for amounts under ten cents (a test month is cheap)."""
    return f"${value:,.2f}" if value >= 0.1 or value == 0 else f"${value:,.4f}"


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """Round axis steps (1, 2 or 5 times a power of ten) covering 0..top."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [step * i for i in range(math.ceil(top / step - 1e-9) + 1)]


def _svg(width: int, height: int, label: str, body: list[str]) -> SafeString:
    return mark_safe(  # noqa: S308 - every text node below went through escape()
        f'<svg class="llmq-chart" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" preserveAspectRatio="xMinYMin meet" '
        f'aria-label="{escape(label)}" style="max-width:{width}px">'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


def stacked_bars(
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    label: str,
    fmt: Formatter = compact,
    width: int = 760,
    height: int = 300,
) -> SafeString:
    """Vertical bars, one per category, stacked by series, with a legend."""
    left, right, top, bottom = 64, 16, 16, 64
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(s.values[i] for s in series) for i in range(len(categories))]
    ticks = nice_ticks(max(totals, default=0))
    scale = plot_h / ticks[-1]
    body: list[str] = []
    for tick in ticks:
        y = top + plot_h - tick * scale
        body.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="currentColor" stroke-opacity="0.15"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="currentColor">{escape(fmt(tick))}</text>'
        )
    slot = plot_w / max(len(categories), 1)
    bar_w = min(48.0, slot * 0.7)
    for i, category in enumerate(categories):
        x = left + slot * i + (slot - bar_w) / 2
        y = top + plot_h
        for n, s in enumerate(series):
            value = s.values[i]
            if value <= 0:
                continue
            h = value * scale
            y -= h
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[n % len(PALETTE)]}"><title>{escape(category)} · '
                f"{escape(s.name)}: {escape(fmt(value))}</title></rect>"
            )
        body.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
            f'font-size="11" fill="currentColor">{escape(category)}</text>'
        )
        if totals[i] > 0:
            body.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" '
                f'font-size="10" fill="currentColor">{escape(fmt(totals[i]))}</text>'
            )
    body.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="currentColor" stroke-opacity="0.6"/>'
    )
    x = left
    for n, s in enumerate(series):  # legend below the axis labels
        body.append(
            f'<rect x="{x}" y="{height - 22}" width="12" height="12" '
            f'fill="{PALETTE[n % len(PALETTE)]}"/>'
            f'<text x="{x + 16}" y="{height - 12}" font-size="11" fill="currentColor">'
            f"{escape(s.name)}</text>"
        )
        x += 28 + 7 * len(s.name)
    if not any(totals):
        body.append(_empty(width, height))
    return _svg(width, height, label, body)


def horizontal_bars(
    rows: Sequence[tuple[str, float, str]],
    *,
    label: str,
    fmt: Formatter = compact,
    width: int = 760,
    color: str = PALETTE[0],
) -> SafeString:
    """One bar per row ``(label, value, note)``, largest first as given."""
    row_h, left, right, top = 26, 180, 150, 8
    height = top * 2 + row_h * max(len(rows), 1)
    plot_w = width - left - right
    peak = max((value for _, value, _ in rows), default=0) or 1
    body: list[str] = []
    for i, (name, value, note) in enumerate(rows):
        y = top + i * row_h
        w = max(value / peak * plot_w, 1 if value > 0 else 0)
        shown = name if len(name) <= 26 else name[:25] + "…"
        body.append(
            f'<text x="{left - 8}" y="{y + 17}" text-anchor="end" font-size="12" '
            f'fill="currentColor">{escape(shown)}</text>'
            f'<rect x="{left}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{color}">'
            f"<title>{escape(name)}: {escape(fmt(value))} {escape(note)}</title></rect>"
            f'<text x="{left + w + 6:.1f}" y="{y + 17}" font-size="11" fill="currentColor">'
            f"{escape(fmt(value))} {escape(note)}</text>"
        )
    if not rows:
        body.append(_empty(width, height))
    return _svg(width, height, label, body)


def _empty(width: int, height: int) -> str:
    return (
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="13" '
        f'fill="currentColor" fill-opacity="0.6">No usage recorded yet</text>'
    )
