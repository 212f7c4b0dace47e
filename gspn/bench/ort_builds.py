"""A/B of ONNX Runtime custom-operator builds against the memory floor, per direction and shape
(float32): a tool for work on the C++ kernel (``gspn bench`` times the built library).

    .venv/bin/python -m gspn.bench.ort_builds [--runs 5] [--library NAME=PATH ...] [--quick]

Prints ms and x-floor (``gspn.bench.core.scan_bytes`` / copy bandwidth measured in the same run)
for the benchmark shapes of ``gspn.bench.scans`` and the GSPN-T mixer scans at 224x224, with
``intra_op_num_threads = torch.get_num_threads()``. Each ``--library`` (default: the built
library) gets its own sessions, timed interleaved on the same inputs (their outputs compared).
Sessions of several libraries in one process disturb each other through their spinning thread
pools: for before/after figures, run one library per process, alternately, and take medians.
The reported figure is the median over ``--runs`` rounds of ``median_seconds``.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnxruntime as ort
import torch

import export
from gspn_ref import DIRECTIONS

from .core import copy_bandwidth, median_seconds, scan_bytes
from .scans import FULL_SHAPES, scan_inputs

def custom_session(direction: str, library: str | None) -> ort.InferenceSession:
    threads = torch.get_num_threads()
    model = export.scan_model(direction)
    if library is None:
        return export.session(model, intra_op_num_threads=threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--library", action="append", default=[], help="NAME=PATH of a built library")
    parser.add_argument("--quick", action="store_true", help="only 56x56 and 256x256")
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    args = parser.parse_args(argv)
    libraries = [tuple(spec.split("=", 1)) for spec in args.library] or [("built", None)]
    shapes = FULL_SHAPES  # includes GSPN-T's mixer scans
    if args.quick:
        shapes = ((1, 192, 192, 56, 56), (1, 16, 16, 256, 256), (1, 576, 576, 56, 56), (1, 4608, 4608, 7, 7))
    directions = args.directions.split(",")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.2f} GB/s, {torch.get_num_threads()} threads")
    print(f"{'case':>22} dir  floor_ms " + " ".join(f"{name + ' ms':>12} {'x':>5}" for name, _ in libraries))
    for shape in shapes:
        for direction in directions:
            inputs = scan_inputs(shape, direction)
            feeds = export.scan_feeds(*inputs)
            sessions = [custom_session(direction, path) for _, path in libraries]
            reference = sessions[0].run(None, feeds)[0]
            for session in sessions[1:]:
                np.testing.assert_allclose(session.run(None, feeds)[0], reference, rtol=1e-5, atol=1e-5)
            samples = [[] for _ in sessions]
            floor = scan_bytes(*shape, torch.float32) / bandwidth
            for _ in range(args.runs):
                for k, session in enumerate(sessions):
                    samples[k].append(median_seconds(lambda s=session: s.run(None, feeds), args.repeat, 1))
            cells = []
            for times in samples:
                seconds = statistics.median(times)
                cells.append(f"{seconds * 1e3:12.3f} {seconds / floor:5.2f}")
            name = "x".join(map(str, shape))
            print(f"{name:>22} {direction} {floor * 1e3:8.3f} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
