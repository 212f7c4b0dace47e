"""Benchmark every available kernel; prints a table and saves JSON (same as `gspn bench`).

    python examples/benchmark.py --json out/bench.json [--quick]
"""

import sys

from gspn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
