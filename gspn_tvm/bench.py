"""Benchmark: TVM CPU kernels against the reference and against the memory floor.

The memory floor of a pass is the bytes it must move (``gspn_ref.benchmark.scan_bytes``) divided by
the bandwidth of a large tensor copy measured in the same run. ``run()`` returns one row per
(shape, direction, pass); ``python -m gspn_tvm.bench`` prints the table.
"""

from __future__ import annotations

import time

import torch

from gspn_ref import gspn_scan_backward_ref, gspn_scan_ref
from gspn_ref.benchmark import copy_bandwidth, machine_description, median_time, print_table, scan_bytes

from . import build, kernels

#: (B, C, H, W): maps larger than the caches, and the 56x56 stage of a classifier.
FULL_SHAPES = ((2, 8, 1024, 1024), (1, 192, 56, 56))
QUICK_SHAPES = ((1, 4, 1024, 1024), (1, 192, 56, 56))
DIRECTIONS = ("t2b", "l2r")  # one row scan, one column scan (b2t/r2l mirror them)
COLUMNS = ["shape", "direction", "pass", "tvm_ms", "ref_ms", "floor_ms", "tvm_x_floor", "speedup_vs_ref"]


def _inputs(B, C, H, W, dtype):
    gen = torch.Generator().manual_seed(0)
    x, lam = (torch.randn(B, C, H, W, generator=gen).to(dtype) for _ in range(2))
    gl, gm, gr = (torch.rand(B, C, H, W, generator=gen).to(dtype) / 3 for _ in range(3))
    return x, lam, gl, gm, gr


def compile_and_load_seconds(dtype: str = "float32") -> dict[str, float]:
    """Compile time of a fresh library and load time of the cached one (a throwaway cache folder)."""
    import os
    import tempfile

    saved = os.environ.get("GSPN_CACHE_DIR")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["GSPN_CACHE_DIR"] = folder
        try:
            start = time.perf_counter()
            build.load_scan_library("cpu", dtype)
            first = time.perf_counter() - start
            compile_s = build.timings[("cpu", dtype)]["compile_s"]
            start = time.perf_counter()
            build.load_scan_library("cpu", dtype)
            cached = time.perf_counter() - start
        finally:
            if saved is None:
                os.environ.pop("GSPN_CACHE_DIR", None)
            else:
                os.environ["GSPN_CACHE_DIR"] = saved
    return {"compile_s": compile_s, "first_use_s": first, "cached_load_s": cached}


def run(quick: bool = False, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Time TVM CPU and the reference, forward and backward; rows with times in ms and ratios."""
    repeat = 3 if quick else 7
    bandwidth = copy_bandwidth(1 << 27 if quick else 1 << 29)
    rows = []
    for B, C, H, W in QUICK_SHAPES if quick else FULL_SHAPES:
        x, lam, gl, gm, gr = _inputs(B, C, H, W, dtype)
        gh = torch.randn_like(x)
        for direction in DIRECTIONS:
            h = kernels.scan_forward(x, lam, gl, gm, gr, direction, 0)
            passes = {
                "forward": (
                    lambda: kernels.scan_forward(x, lam, gl, gm, gr, direction, 0),
                    lambda: gspn_scan_ref(x, lam, gl, gm, gr, direction, 0),
                ),
                "backward": (
                    lambda: kernels.scan_backward(gh, x, lam, gl, gm, gr, h, direction, 0),
                    lambda: gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, 0),
                ),
            }
            for name, (tvm_fn, ref_fn) in passes.items():
                tvm_s = median_time(tvm_fn, repeat=repeat, warmup=1)
                ref_s = median_time(ref_fn, repeat=max(1, repeat // 2), warmup=1)
                floor_s = scan_bytes(B, C, C, H, W, dtype, backward=name == "backward") / bandwidth
                rows.append(
                    {
                        "shape": f"{B}x{C}x{H}x{W}",
                        "direction": direction,
                        "pass": name,
                        "tvm_ms": round(tvm_s * 1e3, 3),
                        "ref_ms": round(ref_s * 1e3, 3),
                        "floor_ms": round(floor_s * 1e3, 3),
                        "tvm_x_floor": round(tvm_s / floor_s, 2),
                        "speedup_vs_ref": round(ref_s / tvm_s, 1),
                    }
                )
    return rows


def main(quick: bool = False) -> list[dict]:
    print(machine_description())
    print("compile/cache:", {k: round(v, 3) for k, v in compile_and_load_seconds().items()})
    rows = run(quick=quick)
    print_table(rows, COLUMNS)
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
