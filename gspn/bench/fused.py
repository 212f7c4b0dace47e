"""The fused scan (``gspn::fused_scan``: logits, gate and skip in, ``y`` out) per backend, against
what it replaces: ``normalize_weights``, the scan and the gate and skip as separate ops, the way
``GSPN(fused=False)`` runs a direction.

Backends: ``tvm-cpu`` and ``tvm-cpu unfused`` (the TVM scan kernel between torch's elementwise
ops), ``ort-custom`` (one ``GSPNFusedScan`` node) and ``ort-custom unfused`` (standard ONNX ops
around one ``GSPNScan`` node, from exporting the unfused composition), ``torch-reference``. The
floor is :func:`gspn.bench.core.fused_scan_bytes` over the copy bandwidth of the same run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import export
import gspn_tvm
from gspn_ref import DIRECTIONS, gspn_fused_scan, gspn_fused_scan_ref, gspn_scan, normalize_weights

from .core import fused_scan_bytes, median_seconds, row
from .scans import shape_name

FULL_SHAPES = ((2, 8, 8, 1024, 1024), (1, 192, 192, 56, 56), (1, 576, 576, 56, 56))
QUICK_SHAPES = ((1, 192, 192, 56, 56),)
COLUMNS = ["case", "direction", "backend", "ms", "floor_ms", "x_floor", "speedup"]


def fused_inputs(shape, dtype=torch.float32, seed: int = 0):
    """``(u, lam, al, am, ar, gate, skip)`` for ``shape = (B, C, G, H, W)``, logits of scale 2."""
    B, C, G, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    u, lam, gate, skip = torch.randn(4, B, C, H, W, generator=gen, dtype=dtype)
    al, am, ar = torch.randn(3, B, G, H, W, generator=gen, dtype=dtype) * 2
    return u, lam, al, am, ar, gate, skip


class Unfused(torch.nn.Module):
    """One direction of ``GSPN(fused=False)``: normalize, scan, gate and skip as separate ops."""

    def __init__(self, direction: str):
        super().__init__()
        self.direction = direction

    def forward(self, u, lam, al, am, ar, gate, skip):
        gl, gm, gr = normalize_weights(al, am, ar, self.direction)
        return gspn_scan(u, lam, gl, gm, gr, self.direction) * gate + u * skip


def _session(model: torch.nn.Module, inputs, folder: Path, name: str):
    path = folder / f"{name}.onnx"
    export.to_onnx(model, inputs, path, dynamic=False)
    return export.session(path, intra_op_num_threads=torch.get_num_threads())


def run(shapes=None, quick: bool = False, bandwidth: float = 1.0, directions=DIRECTIONS) -> list[dict]:
    """Rows of table ``"fused"`` for every shape, direction and backend (see the module docstring)."""
    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    repeat = 3 if quick else 9
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for shape in shapes:
            for direction in directions:
                inputs = fused_inputs(shape)
                unfused = Unfused(direction)
                timings = {"torch-reference": median_seconds(lambda: gspn_fused_scan_ref(*inputs, direction), 1, 1)}
                with gspn_tvm.enabled():
                    timings["tvm-cpu"] = median_seconds(lambda: gspn_fused_scan(*inputs, direction), repeat, 2)
                    timings["tvm-cpu unfused"] = median_seconds(lambda: unfused(*inputs), repeat, 2)
                feeds_of = lambda session: {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}  # noqa: E731
                fused_session = export.session(export.fused_scan_model(direction),
                                               intra_op_num_threads=torch.get_num_threads())  # fmt: skip
                unfused_session = _session(unfused, inputs, Path(tmp), f"unfused_{direction}")
                for backend, session in (("ort-custom", fused_session), ("ort-custom unfused", unfused_session)):
                    feeds = feeds_of(session)
                    timings[backend] = median_seconds(lambda: session.run(None, feeds), repeat, 2)
                floor = fused_scan_bytes(*shape, torch.float32) / bandwidth
                for backend, seconds in timings.items():
                    rows.append(row("fused", shape_name(shape), backend, seconds, direction=direction, floor_seconds=floor))
    return rows
