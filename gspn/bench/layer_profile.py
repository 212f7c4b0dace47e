"""Where the GSPN layer's time goes: ``GSPN(96)`` at 56x56, torch eager with the TVM kernels, with
the fused scan (one ``gspn::fused_scan`` per direction) and without it (``fused=False``:
``normalize_weights``, ``gspn::scan``, gate and skip as separate ops).

The profile is torch.profiler's self CPU time per operator, grouped by what the operator does.
The grouping is by operator name: ``mul``/``add`` count as "normalization and gating" wherever they
come from (GRN's two and the directions' ``alpha`` sum are among them: a few percent).
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import gspn_tvm
from gspn_ref import GSPN

from .core import median_seconds, row

DIM, SIDE, BATCH = 96, 56, 1
COLUMNS = ["case", "backend", "ms", "extra"]
CATEGORIES = ("convolutions", "scans", "normalization and gating", "layer norm and GRN", "other")
_CONV = ("conv", "mkldnn", "addmm", "matmul", "mm")
_NORM = ("layer_norm", "pow", "sqrt", "mean", "sum", "norm")
_ELEMENTWISE = ("sigmoid", "div", "clamp", "mul", "add", "sub", "rsub", "arange", "gt", "lt", "ge", "le",
                "where", "_to_copy", "copy_", "to", "masked_fill")  # fmt: skip


def category(op_name: str) -> str:
    """The profile group of a torch.profiler operator name such as ``aten::sigmoid``."""
    if op_name.startswith("gspn::"):
        return "scans"
    name = op_name.split("::", 1)[-1]
    if any(k in name for k in _CONV):
        return "convolutions"
    if name in _NORM or name.startswith(("native_layer_norm", "linalg_vector_norm")):
        return "layer norm and GRN"
    if name.rstrip("_") in _ELEMENTWISE or name in _ELEMENTWISE:
        return "normalization and gating"
    return "other"


def profile_layer(layer: torch.nn.Module, x: torch.Tensor, runs: int = 5) -> dict[str, float]:
    """Self CPU milliseconds per :data:`CATEGORIES` entry, per forward (averaged over ``runs``)."""
    layer(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            layer(x)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        totals[category(event.key)] += event.self_cpu_time_total / 1e3 / runs
    return totals


def run(quick: bool = False) -> list[dict]:
    """Rows of table ``"layer_profile"``: case ``"GSPN(96) 56x56 fused"`` / ``"... unfused"``,
    ``ms`` the median forward time, ``extra`` the share of each category in percent."""
    torch.manual_seed(0)
    fused = GSPN(DIM).eval()
    unfused = GSPN(DIM, fused=False).eval()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(BATCH, DIM, SIDE, SIDE)
    rows = []
    with torch.no_grad(), gspn_tvm.enabled():
        for name, layer in (("unfused", unfused), ("fused", fused)):
            seconds = median_seconds(lambda: layer(x), repeat=5 if quick else 15)
            totals = profile_layer(layer, x, runs=2 if quick else 5)
            whole = sum(totals.values()) or 1.0
            shares = {k.replace(" ", "_"): round(100 * v / whole, 1) for k, v in totals.items()}
            rows.append(row("layer_profile", f"GSPN({DIM}) {SIDE}x{SIDE} {name}", "torch-tvm", seconds, **shares))
    return rows
