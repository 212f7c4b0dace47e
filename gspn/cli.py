"""The ``gspn`` command: ``gspn demo`` (every capability on built-in inputs) and ``gspn bench``."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path


# The Python warnings that `gspn demo` and `gspn bench` trigger in the libraries they call and that
# are harmless, each named by category, message and the module it is attributed to; every other
# warning stays visible. Found by running both commands with every warning shown (warm and cold
# kernel cache): this is the only one, printed once per ONNX export.
KNOWN_HARMLESS_WARNINGS = (
    # torch.onnx.export -> ExportedProgram.run_decompositions deep-copies the module call graph, and
    # rebuilding torch.utils._pytree.LeafSpec (deprecated in torch 2.13, still used inside torch)
    # warns; the deprecation is torch's own business and the exported model is unaffected.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"copyreg$"),
)


def quiet_known_warnings() -> None:
    """Silence :data:`KNOWN_HARMLESS_WARNINGS` only, and the ONNX exporter's log lines about optional
    packages (torchvision) that the demo does not use."""
    import torch  # noqa: F401  (torch configures its loggers on import; set the level after that)

    for category, message, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
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
    quiet_known_warnings()
    if args.command == "demo":
        from .demo import demo

        demo(args.out)
    else:
        from .bench.runner import run

        run(args.json, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
