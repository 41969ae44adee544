"""The peers bench's report (``make bench-peers``): what its table and plot are built on."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from tests.benchmarks.long_streams import Phase, figures
from tests.benchmarks.peers.bench import (
    ASYNC,
    DIRECT,
    LITELLM,
    QUICK,
    SYNC,
    Figures,
    Report,
    markdown,
    summary,
)
from tests.benchmarks.peers.plot import streams_svg, svg

SVG = "{http://www.w3.org/2000/svg}"


def _stream(ttft: float | None, gap: float, error: str | None = None) -> dict:
    """One stream as ``stream_ends client`` reports it: 10 events ``gap`` s apart."""
    started = ttft is not None
    return {"status": 200 if started else 0, "ttft": ttft, "gaps": [gap] * 9 if started else [],
            "at": 0.0, "events": 10 if started else 0, "finished": error is None,
            "error": error}  # fmt: skip


def _phase(path: str, ttft: float, gap: float, *, server: bool, lag: bool = False,
           ledger: bool = False, failed: int = 0) -> Phase:  # fmt: skip
    """Three streams through ``path``; ``failed`` of them cut before a first event."""
    phase = Phase(path, 3, client_cpu=0.1, wall=5.0, load=1.0)
    phase.streams = [_stream(ttft, gap) for _ in range(3 - failed)]
    phase.streams += [_stream(None, gap, "cut at the deadline") for _ in range(failed)]
    if server:
        phase.server_cpu, phase.rss = 0.3, (100 * 2**20, 100 * 2**20 + 3 * 2048)
    if lag:
        phase.lag = [1.0, 2.0, 30.0]
    if ledger:
        phase.left = (0, 0)
    return phase


def _long() -> list[dict]:
    direct = _phase(DIRECT, 0.001, 0.1, server=False)
    return [
        figures(direct, direct),
        figures(_phase(SYNC, 2.0, 0.1, server=True, ledger=True, failed=1), direct),
        figures(_phase(ASYNC, 0.011, 0.12, server=True, lag=True, ledger=True), direct),
        figures(_phase(LITELLM, 0.021, 0.3, server=True), direct),
    ]


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
    report.long = _long()
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
    assert text.count("\n| ") == 4 + 2 + 4  # 2 headers, 4 short rows, 4 long rows
    assert f"| 3 | {SYNC} | 1 (2 of 3 started) |" in text
    assert f"| 3 | {LITELLM} | 0 |" in text
    assert "| (no gateway) |" in text


def test_a_long_stream_figure_a_path_does_not_report_is_a_blank_cell():
    lines = {line.split(" | ")[1]: line.split(" | ") for line in markdown(_report()).splitlines()
             if line.startswith("| 3 | ")}  # fmt: skip
    # | N | path | errors | first event | gap | CPU | cores | memory | lag | left | load |
    lag, left, cpu = 8, 9, 5
    assert lines[ASYNC][lag] == "30.0 / 30.0 ms"  # p99 of three samples is the worst
    assert lines[ASYNC][left] == "0 / 0"
    assert lines[LITELLM][lag] == lines[LITELLM][left] == ""  # no sampler, no ledger
    assert lines[SYNC][lag] == ""  # gunicorn runs no loop-lag sampler
    assert lines[DIRECT][cpu] == lines[DIRECT][lag] == lines[DIRECT][left] == ""
    assert lines[LITELLM][cpu] == "100.0 ms; 10000 µs"  # 0.3 s over 3 streams, 30 events
    assert "(+20.0)" in lines[LITELLM][3]  # added p99 over direct at the same N


def test_the_long_stream_plot_has_a_bar_per_figure_and_n():
    tree = ET.fromstring(streams_svg(_long(), "5 s streams", "1.108.7"))
    bars = [e for e in tree.iter(f"{SVG}rect") if e.get("fill") != "white"]
    # 4 panels: first event p99 and gap p99 for the 4 targets, CPU and memory per stream
    # for the 3 with a server; one N, so one legend swatch.
    assert len(bars) == 4 + 4 + 3 + 3 + 1


def test_the_plot_is_svg_with_a_bar_for_every_figure_it_has():
    tree = ET.fromstring(svg(summary(_report()), "now", "1.108.7"))
    bars = [e for e in tree.iter(f"{SVG}rect") if e.get("fill") != "white"]
    # 3 panels x 4 targets x 2 kinds, less direct's 2 CPU bars, plus 2 legend swatches.
    assert len(bars) == 3 * 4 * 2 - 2 + 2
