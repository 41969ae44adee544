"""The peers bench's report (``make bench-peers``): what its table and plot are built on."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from tests.benchmarks.peers.bench import (
    ASYNC,
    DIRECT,
    LITELLM,
    QUICK,
    SYNC,
    Figures,
    Report,
    StreamResult,
    markdown,
    summary,
)
from tests.benchmarks.peers.plot import svg


def _report() -> Report:
    def figures(ms: float, cpu: bool) -> dict[str, Figures]:
        return {
            kind: Figures(
                one=[(ms + extra + k) / 1e3 for k in range(10)],
                many=[ms / 1e3] * 10,
                rates=[100.0, 120.0, 110.0],
                cpu=[0.004, 0.005, 0.006] if cpu else [],
            )
            for kind, extra in (("plain", 0.0), ("stream", 5.0))
        }

    report = Report("2026-12-03 20:00 UTC", "2 cores", {"litellm": "1.108.7"},
                    [(1.0, 1.0, 1.0)], QUICK)  # fmt: skip
    report.short = {DIRECT: figures(2, cpu=False), SYNC: figures(8, cpu=True),
                    ASYNC: figures(12, cpu=True), LITELLM: figures(20, cpu=True)}  # fmt: skip
    report.long = {DIRECT: StreamResult(3, 4.0, ttft=[0.1] * 3, gaps=[0.1] * 90),
                   LITELLM: StreamResult(3, 4.0, errors=1, ttft=[0.2] * 2, gaps=[0.2] * 60,
                                         cpu_per_stream=0.09, memory_per_stream=2048)}  # fmt: skip
    return report


def test_added_latency_is_the_p50_less_the_direct_p50_of_the_same_run():
    rows = summary(_report())
    # p50 of 10 samples is the 6th: direct 7 ms (plain) and 12 ms (stream).
    assert round(rows[SYNC]["plain added p50"], 6) == 6.0
    assert round(rows[LITELLM]["stream added p50"], 6) == 18.0
    assert rows[DIRECT]["plain added p50"] == 0
    assert rows[SYNC]["plain cpu"] == 5.0  # the median round, in ms
    assert rows[SYNC]["plain req/s"] == 110.0
    assert "plain cpu" not in rows[DIRECT]  # no gateway, no CPU figure


def test_the_table_has_a_row_per_target_and_counts_long_stream_errors():
    text = markdown(_report())
    assert text.count("\n| ") == 4 + 2 + 2  # 2 headers, 4 short rows, 2 long rows
    assert "| LiteLLM proxy | 1 of 3 |" in text
    assert "| (no gateway) |" in text


def test_the_plot_is_svg_with_a_bar_for_every_figure_it_has():
    tree = ET.fromstring(svg(summary(_report()), "now", "1.108.7"))
    bars = [e for e in tree.iter("{http://www.w3.org/2000/svg}rect") if e.get("fill") != "white"]
    # 3 panels x 4 targets x 2 kinds, less direct's 2 CPU bars, plus 2 legend swatches.
    assert len(bars) == 3 * 4 * 2 - 2 + 2
