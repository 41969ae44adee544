"""The peers bench's figures, as hand-written SVG: nothing to install for bar charts.

``svg``: three panels side by side (added p50 one at a time, requests/s at 16 at once,
gateway CPU per request), a group of two bars per target (non-streamed, streamed).
``streams_svg``: the long streams, four panels (first event p99, event gap p99, gateway
CPU and memory per stream), a group per target with a bar per N. Each bar is labelled
with its value; a figure a target does not have is no bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

#: (title, key, digits of the bar labels)
Panel = tuple[str, str, int]
#: (key prefix, legend label, colour)
Series = tuple[str, str, str]

PANELS: tuple[Panel, ...] = (
    ("added p50, one at a time (ms)", "added p50", 1),
    ("requests/s, 16 at once", "req/s", 0),
    ("gateway CPU per request (ms)", "cpu", 1),
)
KINDS: tuple[Series, ...] = (("plain", "non-streamed", "#4c72b0"),
                             ("stream", "streamed", "#dd8452"))  # fmt: skip
STREAM_PANELS: tuple[Panel, ...] = (
    ("first event p99 (ms)", "first p99", 0),
    ("event gap p99 (ms)", "gap p99", 0),
    ("gateway CPU per stream (ms)", "cpu per stream", 1),
    ("memory per stream (KiB)", "memory per stream", 1),
)
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
WIDTH, HEIGHT, TOP, BOTTOM, GAP = 330, 270, 46, 76, 24
#: Two short lines under each group, where the table's names would overlap.
LABELS = {
    "ours, gunicorn 2x8 threads": "ours, sync|gunicorn",
    "ours, uvicorn 2 workers (async)": "ours, async|uvicorn",
    "LiteLLM proxy": "LiteLLM|uvicorn",
    "LiteLLM proxy, limits in Redis": "LiteLLM|+ Redis",
}


def _panel(x0: float, panel: Panel, series: Sequence[Series],
           rows: dict[str, dict[str, float]]) -> list[str]:  # fmt: skip
    title, key, digits = panel
    values = [row.get(f"{prefix} {key}") for row in rows.values() for prefix, _, _ in series]
    top = max((v for v in values if v is not None), default=1.0) * 1.15 or 1.0
    plot_h = HEIGHT - TOP - BOTTOM
    base_y = TOP + plot_h
    group_w = (WIDTH - 20) / len(rows)
    bar_w = group_w / (len(series) + 1)
    parts = [
        f'<text x="{x0 + WIDTH / 2}" y="20" text-anchor="middle" font-weight="bold">'
        f"{escape(title)}</text>",
        f'<line x1="{x0 + 10}" y1="{base_y}" x2="{x0 + WIDTH - 10}" y2="{base_y}" stroke="#333"/>',
    ]
    for g, (name, row) in enumerate(rows.items()):
        gx = x0 + 10 + g * group_w
        for k, (prefix, _, colour) in enumerate(series):
            value = row.get(f"{prefix} {key}")
            if value is None:
                continue
            h = max(0.0, value) / top * plot_h
            bx = gx + bar_w / 2 + k * bar_w
            parts.append(f'<rect x="{bx:.1f}" y="{base_y - h:.1f}" width="{bar_w - 2:.1f}" '
                         f'height="{h:.1f}" fill="{colour}"/>')  # fmt: skip
            label = f"{value:,.{digits}f}"
            parts.append(f'<text x="{bx + bar_w / 2 - 1:.1f}" y="{base_y - h - 4:.1f}" '
                         f'text-anchor="middle" font-size="10">{label}</text>')  # fmt: skip
        for line, text in enumerate(LABELS.get(name, name).split("|")):
            parts.append(f'<text x="{gx + group_w / 2:.1f}" y="{base_y + 16 + line * 13}" '
                         f'text-anchor="middle" font-size="10">{escape(text)}</text>')  # fmt: skip
    return parts


def chart(panels: Sequence[Panel], series: Sequence[Series],
          rows: dict[str, dict[str, float]], caption: str) -> str:  # fmt: skip
    """Panels side by side over the same ``rows`` (target → ``"<prefix> <key>"`` →
    value), a bar per series in each target's group, the legend and ``caption`` under."""
    width = len(panels) * WIDTH + (len(panels) - 1) * GAP
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" '
        f'viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{HEIGHT}" fill="white"/>',
    ]
    for n, panel in enumerate(panels):
        parts += _panel(n * (WIDTH + GAP), panel, series, rows)
    legend_y = HEIGHT - 22
    for k, (_, label, colour) in enumerate(series):
        x = 20 + k * 120
        parts.append(f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" '
                     f'fill="{colour}"/>')  # fmt: skip
        parts.append(f'<text x="{x + 16}" y="{legend_y}">{escape(label)}</text>')
    parts.append(f'<text x="{width - 10}" y="{legend_y}" text-anchor="end" font-size="10">'
                 f"{escape(caption)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def svg(rows: dict[str, dict[str, float]], started: str, litellm: str) -> str:
    """The short requests' figure for ``rows`` (``bench.summary``), captioned with the
    run's time."""
    caption = f"make bench-peers, {started}; LiteLLM {litellm}; same fake upstream, 2 cores"
    return chart(PANELS, KINDS, rows, caption)


def streams_svg(phases: list[dict[str, Any]], sizes: str, litellm: str) -> str:
    """The long streams' figure for ``phases`` (``long_streams.figures`` rows): a bar
    per N in each target's group; ``sizes`` says how long the streams were, and when."""
    counts = list(dict.fromkeys(row["count"] for row in phases))
    series = [(str(count), f"N = {count:,}", COLOURS[k % len(COLOURS)])
              for k, count in enumerate(counts)]  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    for row in phases:
        figures = rows.setdefault(row["path"], {})
        for _, key, _ in STREAM_PANELS:
            if row[key] is not None:
                figures[f"{row['count']} {key}"] = row[key]
    caption = f"make bench-peers, long streams: {sizes}; LiteLLM {litellm}, 2 cores"
    return chart(STREAM_PANELS, series, rows, caption)
