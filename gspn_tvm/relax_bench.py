"""Whole-model inference: TVM Relax-compiled vs torch eager vs ONNX Runtime with the custom op.

Models: the tiny classifier (``TinyGSPNClassifier()``, 224x224 input, so its first stage runs at
56x56) and a ``GSPNBlock(dim=32)`` at 56x56 and 112x112, batch 1, float32, forward (inference).
Rows: ``kernel`` (which runtime), ``pass``, ``shape (B,C,G,H,W)`` (model and input), ``dtype``,
``ms`` (median wall time) and ``speedup`` (torch eager with the reference kernels / this row).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gspn_ref import GSPNBlock, TinyGSPNClassifier
from gspn_ref.benchmark import machine_description, median_time, print_table

from .relax_frontend import compile_model

COLUMNS = ["kernel", "pass", "shape (B,C,G,H,W)", "dtype", "ms", "speedup"]


def _models(quick: bool):
    """``(description, model, input)``: B, C, G, H, W of the input (G = weight groups of the scans)."""
    torch.manual_seed(0)
    block_sizes = (56,) if quick else (56, 112)
    cases = [
        (f"GSPNBlock(32) 1,32,64,{s},{s}", GSPNBlock(32), torch.randn(1, 32, s, s)) for s in block_sizes
    ]
    side = 112 if quick else 224
    cases.append((f"TinyGSPNClassifier 1,3,-,{side},{side}", TinyGSPNClassifier(), torch.randn(1, 3, side, side)))
    return [(name, model.eval(), x) for name, model, x in cases]


def _eager_runners(model, x) -> dict:
    """Torch eager with the reference kernels and with the TVM kernels registered on gspn::scan."""
    from . import registration

    def eager():
        with torch.no_grad():
            return model(x)

    return {
        "torch eager (reference kernels)": lambda: (registration.disable(), eager()),
        "torch eager (TVM kernels)": lambda: (registration.enable(), eager()),
    }


def _onnx_runtime_runner(model, x, folder: Path):
    """ONNX Runtime with the gspn custom-op library on the exported ``model``."""
    import export

    path = folder / "model.onnx"
    export.to_onnx(model, (x,), path, mode="custom")
    session = export.session(path, intra_op_num_threads=torch.get_num_threads())
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def run(quick: bool = False) -> list[dict]:
    """Time every runtime on every model; returns the table rows (see module docstring)."""
    repeat = 3 if quick else 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, model, x) in enumerate(_models(quick)):
            runners = _eager_runners(model, x)
            compiled = compile_model(model, (x,))
            runners["TVM Relax (whole model)"] = lambda: compiled(x)
            runners["ONNX Runtime (custom op)"] = _onnx_runtime_runner(model, x, Path(tmp) / str(index))
            seconds = {kernel: median_time(fn, repeat=repeat, warmup=2) for kernel, fn in runners.items()}
            baseline = seconds["torch eager (reference kernels)"]
            for kernel, s in seconds.items():
                rows.append(
                    {
                        "kernel": kernel,
                        "pass": "forward",
                        "shape (B,C,G,H,W)": name,
                        "dtype": "float32",
                        "ms": round(s * 1e3, 2),
                        "speedup": round(baseline / s, 2),
                    }
                )
    from . import registration

    registration.disable()
    return rows


def main(quick: bool = False) -> list[dict]:
    print(machine_description())
    rows = run(quick=quick)
    print_table(rows, COLUMNS)
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
