"""``python -m bench [--quick]``: fleetlog against the original design; see bench/README.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.runner import BENCH_DIR, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="Smaller counts and shorter runs (under 2 minutes on 2 cores).")
    parser.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec",
                        help="Redis AOF fsync policy, the same for both systems (default everysec).")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="Where <date>.json, .md and .png go.")
    args = parser.parse_args()
    return run(args.quick, args.appendfsync, args.out)


if __name__ == "__main__":
    sys.exit(main())
