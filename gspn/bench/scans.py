"""The scan operator per backend, against the torch reference and the memory floor.

Backends: ``torch-reference`` (``gspn_scan_ref``), ``tvm-cpu`` (the operator with the TVM kernels
enabled), ``ort-custom`` (a one-node ONNX model with the ``gspn::GSPNScan`` custom operator),
``ort-portable`` (the same scan in standard ONNX operators, in stock ONNX Runtime). Every backend
runs on the same inputs, in all four directions; backward rows exist for the backends that have an
adjoint (the reference and TVM). The floor of a pass is :func:`gspn.bench.core.scan_bytes` divided by
the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import onnxruntime as ort
import torch

import export
import gspn_tvm
from gspn_ref import DIRECTIONS, gspn_scan, gspn_scan_backward_ref, gspn_scan_ref, normalize_weights

from .core import median_seconds, row, scan_bytes

#: (B, C, G, H, W): large maps (beyond the caches), the 56x56 stage of a classifier, mid sizes, and
#: the scans GSPN-T's token mixers run at 224x224 (four frames stacked along channels, per-channel
#: weights; the network scans them l2r, with chunks 2, 2, 14, 7).
GSPN_T_SHAPES = ((1, 576, 576, 56, 56), (1, 1152, 1152, 28, 28), (1, 2304, 2304, 14, 14), (1, 4608, 4608, 7, 7))
FULL_SHAPES = ((2, 8, 8, 1024, 1024), (1, 192, 192, 56, 56), (1, 32, 32, 128, 128), (1, 16, 16, 256, 256),
               *GSPN_T_SHAPES)  # fmt: skip
QUICK_SHAPES = ((1, 4, 4, 512, 512), (1, 192, 192, 56, 56))
#: The portable form runs one ONNX ``Scan`` step per line: only on maps up to this many elements.
PORTABLE_MAX_ELEMENTS = 1 << 20
COLUMNS = ["case", "direction", "pass", "backend", "ms", "floor_ms", "x_floor", "speedup"]


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


def scan_inputs(shape, direction: str, dtype=torch.float32, seed: int = 0):
    """``(x, lam, gl, gm, gr)`` for ``shape = (B, C, G, H, W)``: normalized weights for ``direction``."""
    B, C, G, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    x, lam = torch.randn(2, B, C, H, W, generator=gen, dtype=dtype)
    gl, gm, gr = normalize_weights(*torch.randn(3, B, G, H, W, generator=gen, dtype=dtype), direction)
    return x, lam, gl, gm, gr


def _ort_sessions(direction: str, with_portable: bool) -> dict:
    threads = torch.get_num_threads()
    sessions = {"ort-custom": export.session(export.scan_model(direction), intra_op_num_threads=threads)}
    if with_portable:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        model = export.scan_model(direction, mode="portable").SerializeToString()
        sessions["ort-portable"] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return sessions


def run(shapes=None, quick: bool = False, bandwidth: float = 1.0, directions=DIRECTIONS) -> list[dict]:
    """Rows of table ``"scan"`` for every shape, direction and backend (see the module docstring)."""
    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    repeat, slow_repeat = (3, 1) if quick else (9, 3)
    rows = []
    for shape in shapes:
        B, C, G, H, W = shape
        small = B * C * H * W <= PORTABLE_MAX_ELEMENTS
        for direction in directions:
            x, lam, gl, gm, gr = inputs = scan_inputs(shape, direction)
            gh = torch.randn_like(x)
            h = gspn_scan_ref(*inputs, direction)
            floor = {p: scan_bytes(*shape, x.dtype, backward=p == "backward") / bandwidth for p in ("forward", "backward")}
            timings = {
                ("forward", "torch-reference"): median_seconds(lambda: gspn_scan_ref(*inputs, direction), slow_repeat, 1),
                ("backward", "torch-reference"): median_seconds(
                    lambda: gspn_scan_backward_ref(gh, *inputs, h, direction), slow_repeat, 1),
            }  # fmt: skip
            with gspn_tvm.enabled():
                timings["forward", "tvm-cpu"] = median_seconds(lambda: gspn_scan(*inputs, direction), repeat, 2)
                backward = torch.ops.gspn.scan_backward
                timings["backward", "tvm-cpu"] = median_seconds(
                    lambda: backward(gh, *inputs, h, direction, 0), repeat, 2)  # fmt: skip
            feeds = export.scan_feeds(*inputs)
            for backend, session in _ort_sessions(direction, with_portable=small).items():
                n = repeat if backend == "ort-custom" else slow_repeat
                timings["forward", backend] = median_seconds(lambda: session.run(None, feeds), n, 1)
            for (pass_, backend), seconds in timings.items():
                rows.append(row("scan", shape_name(shape), backend, seconds, direction=direction, pass_=pass_,
                                floor_seconds=floor[pass_]))  # fmt: skip
    return rows
