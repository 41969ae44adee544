"""``python -m tests.benchmarks.peers [--quick] [--no-long] ...`` (``make bench-peers``;
``--help`` lists the options). The long streams take section 11's options (``--counts``,
``--sync-counts``, ``--length``, ``--interval``, ``--ramp``), with this bench's defaults."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tests.benchmarks import long_streams
from tests.benchmarks.__main__ import setup

ROOT = Path(__file__).resolve().parents[3]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.peers")
    parser.add_argument("--quick", action="store_true",
                        help="2 short rounds, and 50 streams of 5 s (a few minutes)")  # fmt: skip
    parser.add_argument("--no-long", action="store_true", help="skip the long streams")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "peers",
                        help="where results.md, results.json and litellm.log go")  # fmt: skip
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/pages/img/peers.svg",
                        help="the SVG to write ('-': none)")  # fmt: skip
    streams = parser.add_argument_group(
        "long streams", "section 11's options; by default N = 100 and 500 (sync at 100 only), "
        "20 s streams opened over 10 s; --quick: N = 50, 5 s streams opened over 2 s")  # fmt: skip
    long_streams.add_options(streams, defaults=False)
    parser.add_argument("--litellm-redis", metavar="REDIS_URL",
                        help="also a LiteLLM whose counters live in this Redis")  # fmt: skip
    args = parser.parse_args(argv)
    setup()
    from tests.benchmarks.peers import bench

    if not (bench.PEERS_VENV / "bin" / "litellm").exists():
        print(f"no LiteLLM in {bench.PEERS_VENV}: run `make bench-peers`", file=sys.stderr)
        return 2
    sizes = bench.QUICK if args.quick else bench.FULL
    given = {name: getattr(args, name) for name in ("length", "interval", "ramp")}
    given |= {name: tuple(getattr(args, name) or ()) for name in ("counts", "sync_counts")
              if getattr(args, name) is not None}  # fmt: skip
    sizes = replace(sizes, **{name: value for name, value in given.items() if value is not None})
    bench.run(
        sizes,
        long=not args.no_long,
        out=args.out,
        plot=None if str(args.plot) == "-" else args.plot,
        litellm_redis=args.litellm_redis,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
