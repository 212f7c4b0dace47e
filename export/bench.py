"""Benchmark: ONNX Runtime custom op vs portable form vs torch reference (vs TVM CPU when available).

``run(quick)`` returns table rows (see ``gspn_ref.benchmark.scan_row``): the scan alone for t2b
and l2r, and the whole GSPN layer, each with its ratio to the memory floor (scan rows) and its
time relative to the custom op (``x custom``). ``python -m export.bench [--quick]`` prints them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

import gspn_ref
from gspn_ref.benchmark import copy_bandwidth, machine_description, median_time, print_table, scan_row

from .onnx_export import scan_feeds, scan_model, to_onnx
from .portable import make_portable
from .runtime import session

SCAN_SHAPES = [(1, 192, 192, 56, 56), (1, 64, 64, 64, 64), (1, 32, 32, 128, 128), (1, 16, 16, 256, 256)]
SCAN_SHAPES_QUICK = [(1, 192, 192, 56, 56), (1, 64, 64, 64, 64)]
LAYER_SHAPES = [(1, 96, 56, 56), (1, 32, 64, 64), (1, 16, 128, 128)]  # (B, dim, H, W)
LAYER_SHAPES_QUICK = [(1, 96, 56, 56)]
COLUMNS = ["what", "kernel", "direction", "shape (B,C,G,H,W)", "ms", "GB/s", "x floor", "x custom"]


def _time_with_tvm(tvm_module, fn, repeat):
    tvm_module.enable()
    try:
        return median_time(fn, repeat, 2)
    finally:
        tvm_module.disable()


def _threads() -> int:
    return os.cpu_count() or 1


def _scan_rows(shapes, repeat, bandwidth, tvm_module) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        B, C, G, H, W = shape
        x, lam = torch.randn(2, B, C, H, W, generator=generator)
        for direction in ("t2b", "l2r"):
            gl, gm, gr = gspn_ref.normalize_weights(*torch.randn(3, B, G, H, W, generator=generator), direction)
            inputs = (x, lam, gl, gm, gr)
            feeds = scan_feeds(*inputs)
            custom = session(scan_model(direction), intra_op_num_threads=_threads())
            portable_options = ort.SessionOptions()
            portable_options.intra_op_num_threads = _threads()
            portable = ort.InferenceSession(
                scan_model(direction, mode="portable").SerializeToString(), portable_options,
                providers=["CPUExecutionProvider"],
            )  # fmt: skip
            timings = {
                "ort-custom": median_time(lambda: custom.run(None, feeds), repeat, 2),
                "ort-portable": median_time(lambda: portable.run(None, feeds), max(2, repeat // 3), 1),
                "torch-reference": median_time(
                    lambda: gspn_ref.gspn_scan_ref(*inputs, direction=direction), max(2, repeat // 3), 1
                ),
            }
            timings["tvm-cpu"] = _time_with_tvm(
                    tvm_module, lambda: gspn_ref.gspn_scan(*inputs, direction=direction), repeat
                )
            for kernel, seconds in timings.items():
                rows.append(scan_row(kernel, shape, x.dtype, seconds, bandwidth, what="scan", direction=direction,
                                     **{"x custom": round(seconds / timings["ort-custom"], 2)}))  # fmt: skip
    return rows


def _layer_rows(shapes, repeat, tvm_module) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for B, dim, H, W in shapes:
            torch.manual_seed(0)
            layer = gspn_ref.GSPN(dim).eval()
            x = torch.randn(B, dim, H, W)
            custom_model = to_onnx(layer, (x,), Path(folder) / f"layer{dim}.onnx")
            custom = session(custom_model, intra_op_num_threads=_threads())
            portable_options = ort.SessionOptions()
            portable_options.intra_op_num_threads = _threads()
            portable = ort.InferenceSession(make_portable(custom_model).SerializeToString(), portable_options,
                                            providers=["CPUExecutionProvider"])  # fmt: skip
            feeds = {"x": x.numpy()}
            with torch.no_grad():
                timings = {
                    "ort-custom": median_time(lambda: custom.run(None, feeds), repeat, 2),
                    "ort-portable": median_time(lambda: portable.run(None, feeds), max(2, repeat // 3), 1),
                    "torch-reference": median_time(lambda: layer(x), max(2, repeat // 3), 1),
                }
                timings["tvm-cpu"] = _time_with_tvm(tvm_module, lambda: layer(x), repeat)
            d_inner = 2 * dim
            for kernel, seconds in timings.items():
                rows.append({
                    "what": "GSPN layer", "kernel": kernel, "direction": "all 4",
                    "shape (B,C,G,H,W)": f"{B}x{d_inner}x{d_inner}x{H}x{W}", "dtype": "float32",
                    "ms": round(seconds * 1e3, 3), "x custom": round(seconds / timings["ort-custom"], 2),
                })  # fmt: skip
    return rows


def run(quick: bool = False) -> list[dict]:
    """Time every backend on the same inputs; returns the table rows."""
    repeat = 5 if quick else 15
    bandwidth = copy_bandwidth(1 << 26 if quick else 1 << 28)
    import gspn_tvm as tvm_module
    rows = _scan_rows(SCAN_SHAPES_QUICK if quick else SCAN_SHAPES, repeat, bandwidth, tvm_module)
    rows += _layer_rows(LAYER_SHAPES_QUICK if quick else LAYER_SHAPES, repeat, tvm_module)
    for row in rows:
        row["machine"] = machine_description()
        row["copy GB/s"] = round(bandwidth / 1e9, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ONNX Runtime custom op vs portable form vs reference")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    print(rows[0]["machine"], f"- copy bandwidth {rows[0]['copy GB/s']} GB/s")
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
