"""``python -m tests.benchmarks.peers [--quick] [--no-long] ...`` (``make bench-peers``;
``--help`` lists the options)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tests.benchmarks.__main__ import setup

ROOT = Path(__file__).resolve().parents[3]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.peers")
    parser.add_argument("--quick", action="store_true",
                        help="2 short rounds and 30 streams of 4 s (a few minutes)")  # fmt: skip
    parser.add_argument("--no-long", action="store_true", help="skip the long streams")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "peers",
                        help="where results.md, results.json and litellm.log go")  # fmt: skip
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/pages/img/peers.svg",
                        help="the SVG to write ('-': none)")  # fmt: skip
    parser.add_argument("--streams", type=int, help="long streams at once (100; quick 30)")
    parser.add_argument("--stream-seconds", type=float, help="each long stream's length")
    parser.add_argument("--litellm-redis", metavar="REDIS_URL",
                        help="also a LiteLLM whose counters live in this Redis")  # fmt: skip
    args = parser.parse_args(argv)
    setup()
    from tests.benchmarks.peers import bench

    if not (bench.PEERS_VENV / "bin" / "litellm").exists():
        print(f"no LiteLLM in {bench.PEERS_VENV}: run `make bench-peers`", file=sys.stderr)
        return 2
    sizes = bench.QUICK if args.quick else bench.FULL
    sizes = replace(
        sizes,
        streams=args.streams or sizes.streams,
        stream_seconds=args.stream_seconds or sizes.stream_seconds,
    )
    bench.run(
        sizes,
        long_stream=None if args.no_long else bench.long_streams,
        out=args.out,
        plot=None if str(args.plot) == "-" else args.plot,
        litellm_redis=args.litellm_redis,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
