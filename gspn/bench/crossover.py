"""The comparison users make: the GSPN layer against attention over the same tokens.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` with its projections (a fused
QKV 1x1 projection, 3 heads, an output projection), on the same channels and tokens as the GSPN
layer (``gspn_ref.GSPN(dim)``). Both run per backend at square sizes; attention's cost grows with
the square of the token count, the layer's linearly, so there is a side beyond which the layer is
faster: the crossover. Sizes at which attention's score matrix would not fit are run for the
layer only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import export
import gspn_tvm
from gspn_ref import GSPN

from .core import median_seconds, row

DIM, HEADS = 96, 3
SIDES = (14, 28, 56, 112)
QUICK_SIDES = (14, 28, 56)
#: Largest token count for which attention runs (its float32 score matrix per head: N^2 * 4 bytes).
ATTENTION_MAX_TOKENS = 112 * 112
BACKENDS = ("torch-eager", "torch-compile", "ort", "tvm-relax")
COLUMNS = ["case", "backend", "ms", "extra"]


class Attention2d(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions of ``(B, dim, H, W)``, with projections."""

    def __init__(self, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: expected a divisor of dim = {dim}; got {heads}")
        self.heads = heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C // heads)
        return self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


def _runner(backend: str, model: nn.Module, x: torch.Tensor, folder: Path):
    if backend == "torch-eager":
        return lambda: model(x)
    if backend == "torch-compile":
        compiled = torch.compile(model)
        compiled(x)
        return lambda: compiled(x)
    if backend == "ort":
        path = folder / f"{type(model).__name__}_{x.shape[-1]}.onnx"
        export.to_onnx(model, (x,), path, dynamic=False)
        session = export.session(path, intra_op_num_threads=torch.get_num_threads())
        feeds = {session.get_inputs()[0].name: x.numpy()}
        return lambda: session.run(None, feeds)
    if backend == "tvm-relax":
        compiled = gspn_tvm.compile_model(model, (x,), dynamic=False)
        return lambda: compiled(x)
    raise ValueError(f"backend: expected one of {BACKENDS}; got {backend!r}")


def run(quick: bool = False, sides=None, backends=BACKENDS) -> list[dict]:
    """Rows of table ``"crossover"``: case ``"<model> <side>x<side>"``; ``extra.tokens``."""
    sides = sides or (QUICK_SIDES if quick else SIDES)
    repeat = 3 if quick else 7
    rows = []
    torch.manual_seed(0)
    models = {"GSPN layer": GSPN(DIM).eval(), "attention": Attention2d().eval()}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), gspn_tvm.enabled():
        for side in sides:
            x = torch.randn(1, DIM, side, side)
            for name, model in models.items():
                if name == "attention" and side * side > ATTENTION_MAX_TOKENS:
                    continue
                for backend in backends:
                    fn = _runner(backend, model, x, Path(tmp))
                    seconds = median_seconds(fn, repeat, 1)
                    rows.append(row("crossover", f"{name} {side}x{side}", backend, seconds, tokens=side * side))
    return rows


def crossover_sides(rows: list[dict]) -> dict[str, int | None]:
    """Per backend, the smallest side from which the GSPN layer is faster than attention at every
    measured larger side (None: never)."""
    result = {}
    for backend in dict.fromkeys(r["backend"] for r in rows if r["table"] == "crossover"):
        times = {(r["case"].split(" ")[0] == "GSPN", int(r["case"].rsplit("x", 1)[1])): r["ms"]
                 for r in rows if r["table"] == "crossover" and r["backend"] == backend}  # fmt: skip
        sides = sorted(s for (is_gspn, s) in times if not is_gspn and (True, s) in times)
        faster = [s for s in sides if times[True, s] < times[False, s]]
        result[backend] = next((s for s in sides if all(t in faster for t in sides if t >= s)), None)
    return result
