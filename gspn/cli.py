"""The ``gspn`` command: ``gspn demo`` (every capability on built-in inputs) and ``gspn bench``."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path


def _quiet_known_warnings() -> None:
    """Silence only the named warnings that the demo's libraries print and that are harmless."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gspn", description="Generalized Spatial Propagation Network tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run every capability on built-in inputs")
    p_demo.add_argument("--out", type=Path, default=Path("out"), help="folder for heatmaps and exported models")
    p_bench = sub.add_parser("bench", help="benchmark every backend; print tables, save JSON and plots")
    p_bench.add_argument("--json", type=Path, default=Path("out/bench.json"))
    p_bench.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    args = parser.parse_args(argv)
    _quiet_known_warnings()
    if args.command == "demo":
        from .demo import demo

        demo(args.out)
    else:
        from .bench.runner import run

        run(args.json, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
