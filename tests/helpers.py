"""Test helpers: the shared strategies, inputs and dtype-derived comparison (from the public
``gspn_ref.testing``), and an oracle of the scan that shares no code with ``gspn_ref``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn_ref import is_column, is_reversed, line_count
from gspn_ref.testing import (  # noqa: F401  (re-exported for the tests)
    FLOAT_DTYPES,
    ScanCase,
    assert_close_scaled,
    make_scan_inputs,
    scan_cases,
    scan_tolerance,
)


def naive_scan_float64(x, lam, gl, gm, gr, direction: str, chunk: int = 0) -> torch.Tensor:
    """SPEC section 2 written out element by element in float64: an oracle for every scan kernel.

    ``x``, ``lam``: ``(B, C, H, W)``; ``gl``, ``gm``, ``gr``: ``(B, G, H, W)``. Returns float64
    ``(B, C, H, W)``. Shares no code with ``gspn_ref`` (no scan, direction or affinity helper): one
    Python loop over the lines in scan order and the positions along a line, out-of-range
    neighbours skipped (their weights are never read).
    """
    x, lam, gl, gm, gr = (t.detach().to(device="cpu", dtype=torch.float64) for t in (x, lam, gl, gm, gr))
    C, G = x.shape[1], gl.shape[1]
    group_of_channel = [c // (C // G) for c in range(C)]
    gl, gm, gr = (w[:, group_of_channel] for w in (gl, gm, gr))
    columns = direction in ("l2r", "r2l")
    if columns:  # make dim 2 the line index and dim 3 the position along a line
        x, lam, gl, gm, gr = (t.transpose(2, 3) for t in (x, lam, gl, gm, gr))
    n_lines, P = x.shape[2], x.shape[3]
    order = list(range(n_lines)) if direction in ("t2b", "l2r") else list(range(n_lines - 1, -1, -1))
    h = torch.zeros_like(x)
    previous = None
    for s, line in enumerate(order):
        restart = s == 0 or (chunk > 0 and s % chunk == 0)
        for p in range(P):
            value = lam[:, :, line, p] * x[:, :, line, p]
            if not restart:
                for weight, q in ((gl, p - 1), (gm, p), (gr, p + 1)):
                    if 0 <= q < P:
                        value = value + weight[:, :, line, p] * h[:, :, previous, q]
            h[:, :, line, p] = value
        previous = line
    return (h.transpose(2, 3) if columns else h).contiguous()


def scan_order_of_line(direction, H, W):
    """``(H*W,)`` tensor: the scan index ``s`` of the line holding each row-major position."""
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    line = j if is_column(direction) else i
    n_lines = line_count(direction, H, W)
    return (n_lines - 1 - line if is_reversed(direction) else line).flatten()


def poison_unread_weights(gl, gm, gr, direction, chunk, poison=float("inf")):
    """Copies of the weights with ``poison`` wherever SPEC section 2 says a weight is never used
    (``gl`` at ``p = 0``, ``gr`` at ``p = P - 1``, all three on a segment-start line), and the
    copies with 0 there; plus the boolean ``(H, W)`` masks of both kinds of position."""
    H, W = gl.shape[-2:]
    s = scan_order_of_line(direction, H, W).reshape(H, W)
    starts = (s == 0) | ((s % chunk) == 0 if chunk else torch.zeros_like(s, dtype=torch.bool))
    p_axis = -2 if is_column(direction) else -1
    first = torch.zeros(H, W, dtype=torch.bool)
    last = torch.zeros(H, W, dtype=torch.bool)
    first.select(p_axis, 0).fill_(True)
    last.select(p_axis, -1).fill_(True)
    masks = (first | starts, starts, last | starts)
    poisoned = tuple(w.masked_fill(m, poison) for w, m in zip((gl, gm, gr), masks))
    zeroed = tuple(w.masked_fill(m, 0) for w, m in zip((gl, gm, gr), masks))
    return poisoned, zeroed, first, last, starts


# ---- ONNX models and feeds for the error and fuzz tests of the custom operator -------------------
# (onnx and export are imported inside: the reference tests import this module too.)

SCAN_INPUT_NAMES = ("x", "lam", "gl", "gm", "gr")


def shape_free_scan_model(direction: str = "t2b", chunk: int = 0, elem: int | None = None):
    """``export.scan_model`` with no declared input or output shapes, so that only the kernel checks
    them; ``elem`` (an ``onnx.TensorProto`` element type, default FLOAT) is declared on every one."""
    import onnx

    import export

    elem = onnx.TensorProto.FLOAT if elem is None else elem
    model = export.scan_model(direction, chunk, "float16" if elem == onnx.TensorProto.FLOAT16 else "float32")
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.ClearField("shape")
        value.type.tensor_type.elem_type = elem
    return model


def with_attributes(model, **attributes):
    """A copy of a scan model with the node's attributes replaced: None removes one, an
    ``onnx.AttributeProto`` is used as it is, any other value goes through ``make_attribute``."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name not in attributes]
    node.ClearField("attribute")
    node.attribute.extend(kept)
    for name, value in attributes.items():
        if isinstance(value, onnx.AttributeProto):
            node.attribute.append(value)
        elif value is not None:
            node.attribute.append(onnx.helper.make_attribute(name, value))
    return model


def scan_feeds_of(B=2, C=4, G=2, H=5, W=6, dtype=np.float32, seed=0, direction="t2b") -> dict[str, np.ndarray]:
    """ONNX feeds ``{x, lam, gl, gm, gr}`` of ``dtype`` (a numpy type): valid inputs drawn in float64."""
    tensors = make_scan_inputs(B, C, G, H, W, torch.float64, seed=seed, direction=direction)
    return {name: t.numpy().astype(dtype) for name, t in zip(SCAN_INPUT_NAMES, tensors)}


# ---- a saved TVM artifact run with the TVM runtime alone (no torch, no compiler) -----------------

RUNTIME_LOADER_FILE = Path(__file__).resolve().parents[1] / "gspn_tvm" / "runtime_loader.py"
RUNTIME_ONLY_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    sys.modules["torch"] = None  # as if torch were not installed: any import of it fails
    import numpy as np
    import tvm
    assert tvm.base._RUNTIME_ONLY and "tvm_compiler" not in tvm.base._LOADED_LIBS, tvm.base._LOADED_LIBS
    spec = importlib.util.spec_from_file_location("runtime_loader", sys.argv[1])
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    model = loader.load_artifact(sys.argv[2])
    for i, path in enumerate(sys.argv[4:]):
        np.save(f"{sys.argv[3]}/out_{i}.npy", model.run(np.load(path)))
    try:
        model.run(np.zeros((2, 5, 8, 8), np.float32))
    except ValueError as error:
        print("rejected:", error)
    assert not any(name == "torch" or name.startswith("torch.") for name, m in sys.modules.items() if m is not None)
    """
)


@contextlib.contextmanager
def without_relax_cache():
    """Compile without the session's Relax cache (``$GSPN_RELAX_CACHE_DIR``, set by ``conftest.py``),
    where a test checks what happens during a compile."""
    saved = os.environ.pop("GSPN_RELAX_CACHE_DIR", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["GSPN_RELAX_CACHE_DIR"] = saved


def run_artifact_runtime_only(artifact: Path, inputs: list[np.ndarray], folder: Path) -> tuple[list[np.ndarray], str]:
    """Run the saved artifact on each of ``inputs`` in a fresh process that loads only the TVM runtime
    (``TVM_USE_RUNTIME_LIB=1``) and the loader file, with torch made unimportable; it also feeds a
    (2, 5, 8, 8) float32 input and prints the ``ValueError`` it gets. Returns (outputs, stdout)."""
    paths = []
    for i, x in enumerate(inputs):
        paths.append(folder / f"in_{i}.npy")
        np.save(paths[-1], x)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    result = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY_SCRIPT, str(RUNTIME_LOADER_FILE), str(artifact), str(folder),
         *map(str, paths)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [np.load(folder / f"out_{i}.npy") for i in range(len(inputs))], result.stdout


# --- the backend conformance suites (tests/backends/test_conformance.py, test_fused_conformance.py) ---


@dataclass(frozen=True)
class Backend:
    """One backend of an operator: its forward (the arguments of the operator's reference), whether
    autograd can differentiate it, and the dtypes it serves."""

    name: str
    forward: Callable
    backward: bool  # True: differentiable with autograd
    dtypes: tuple
    max_examples: int | None = None  # None: the Hypothesis profile's
    device: str = "cpu"


def skip_unless_available(backend: Backend) -> Backend:
    if backend.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU in this machine: the TVM CUDA kernels are checked by scripts/gpu_check.sh")
    return backend


def tvm_differentiable(forward_op, backward_op, *, backward_takes_output: bool) -> Callable:
    """``forward_op(*tensors, direction, chunk)`` with the TVM kernels, differentiable through
    ``backward_op(grad, *tensors[, output], direction, chunk)`` (TVM kernels enabled only inside the calls)."""
    import gspn_tvm

    class TvmAutograd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            *tensors, direction, chunk = args
            with gspn_tvm.enabled():
                out = forward_op(*tensors, direction, chunk)
            ctx.save_for_backward(*tensors, out) if backward_takes_output else ctx.save_for_backward(*tensors)
            ctx.scan = (direction, chunk)
            return out

        @staticmethod
        def backward(ctx, grad):
            with gspn_tvm.enabled():
                grads = backward_op(grad.contiguous(), *ctx.saved_tensors, *ctx.scan)
            return (*grads, None, None)

    return lambda *args: TvmAutograd.apply(*args)
