"""The peers bench's figure, as hand-written SVG: nothing to install for one bar chart.

Three panels side by side (added p50 one at a time, requests/s at 16 at once, gateway
CPU per request), a group of two bars per target (non-streamed, streamed), each bar
labelled with its value.
"""

from __future__ import annotations

from html import escape

PANELS = (
    ("added p50, one at a time (ms)", "added p50"),
    ("requests/s, 16 at once", "req/s"),
    ("gateway CPU per request (ms)", "cpu"),
)
KINDS = (("plain", "non-streamed", "#4c72b0"), ("stream", "streamed", "#dd8452"))
WIDTH, HEIGHT, TOP, BOTTOM, GAP = 330, 270, 46, 76, 24
#: Two short lines under each group, where the table's names would overlap.
LABELS = {
    "ours, gunicorn 2x8 threads": "ours, sync|gunicorn",
    "ours, uvicorn 2 workers (async)": "ours, async|uvicorn",
    "LiteLLM proxy": "LiteLLM|uvicorn",
    "LiteLLM proxy, limits in Redis": "LiteLLM|+ Redis",
}


def _panel(x0: float, title: str, key: str, rows: dict[str, dict[str, float]]) -> list[str]:
    values = [row.get(f"{kind} {key}") for row in rows.values() for kind, _, _ in KINDS]
    top = max((v for v in values if v is not None), default=1.0) * 1.15 or 1.0
    plot_h = HEIGHT - TOP - BOTTOM
    base_y = TOP + plot_h
    group_w = (WIDTH - 20) / len(rows)
    bar_w = group_w / 3
    parts = [
        f'<text x="{x0 + WIDTH / 2}" y="20" text-anchor="middle" font-weight="bold">'
        f"{escape(title)}</text>",
        f'<line x1="{x0 + 10}" y1="{base_y}" x2="{x0 + WIDTH - 10}" y2="{base_y}" stroke="#333"/>',
    ]
    for g, (name, row) in enumerate(rows.items()):
        gx = x0 + 10 + g * group_w
        for k, (kind, _, colour) in enumerate(KINDS):
            value = row.get(f"{kind} {key}")
            if value is None:
                continue
            h = max(0.0, value) / top * plot_h
            bx = gx + bar_w / 2 + k * bar_w
            parts.append(f'<rect x="{bx:.1f}" y="{base_y - h:.1f}" width="{bar_w - 2:.1f}" '
                         f'height="{h:.1f}" fill="{colour}"/>')  # fmt: skip
            label = f"{value:.0f}" if key == "req/s" else f"{value:.1f}"
            parts.append(f'<text x="{bx + bar_w / 2 - 1:.1f}" y="{base_y - h - 4:.1f}" '
                         f'text-anchor="middle" font-size="10">{label}</text>')  # fmt: skip
        for line, text in enumerate(LABELS.get(name, name).split("|")):
            parts.append(f'<text x="{gx + group_w / 2:.1f}" y="{base_y + 16 + line * 13}" '
                         f'text-anchor="middle" font-size="10">{escape(text)}</text>')  # fmt: skip
    return parts


def svg(rows: dict[str, dict[str, float]], started: str, litellm: str) -> str:
    """The figure for ``rows`` (``bench.summary``), captioned with the run's time."""
    width = len(PANELS) * WIDTH + (len(PANELS) - 1) * GAP
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" '
        f'viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{HEIGHT}" fill="white"/>',
    ]
    for n, (title, key) in enumerate(PANELS):
        parts += _panel(n * (WIDTH + GAP), title, key, rows)
    legend_y = HEIGHT - 22
    for k, (_, label, colour) in enumerate(KINDS):
        x = 20 + k * 120
        parts.append(f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" '
                     f'fill="{colour}"/>')  # fmt: skip
        parts.append(f'<text x="{x + 16}" y="{legend_y}">{label}</text>')
    parts.append(f'<text x="{width - 10}" y="{legend_y}" text-anchor="end" font-size="10">'
                 f"make bench-peers, {escape(started)}; LiteLLM {escape(litellm)}; "
                 "same fake upstream, 2 cores</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
