"""One conformance suite over every backend of ``gspn::scan`` (in the manner of torchvision's
``RoIOpTester``): each backend supplies its forward, its backward where it has one, and its dtypes;
the same properties run over all of them, through the public API ``gspn_ref.testing``.

Backends: the reference, the TVM CPU kernels, the TVM CUDA kernels (with a GPU), the ONNX Runtime
custom operator, the portable ONNX form in ONNX Runtime and in ``onnx.reference``, and TVM's ONNX
importer (``gspn_tvm.compile_onnx``).
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import Backend, skip_unless_available, tvm_differentiable

import export
import gspn_tvm
from gspn_ref import gspn_scan_ref, line_count, normalize_weights
from gspn_ref.testing import (
    ScanCase,
    assert_close_scaled,
    assert_scan_matches,
    check_scan_case,
    conformance_vectors,
    scan_inputs,
)


_tvm_differentiable = tvm_differentiable(torch.ops.gspn.scan, torch.ops.gspn.scan_backward, backward_takes_output=True)


def _numpy_to_torch(fn):
    @functools.wraps(fn)
    def run(x, lam, gl, gm, gr, direction, chunk):
        out = fn(direction, chunk, str(x.dtype).replace("torch.", ""))(export.scan_feeds(x, lam, gl, gm, gr))
        return torch.from_numpy(np.ascontiguousarray(out))

    return run


@functools.lru_cache(maxsize=None)
def _ort_custom(direction, chunk, dtype):
    session = export.session(export.scan_model(direction, chunk, dtype))
    return lambda feeds: session.run(None, feeds)[0]


@functools.lru_cache(maxsize=None)
def _ort_portable(direction, chunk, dtype):
    model = export.scan_model(direction, chunk, dtype, mode="portable")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


@functools.lru_cache(maxsize=None)
def _onnx_reference(direction, chunk, dtype):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(export.scan_model(direction, chunk, dtype, mode="portable"))
    return lambda feeds: evaluator.run(None, feeds)[0]


@functools.lru_cache(maxsize=None)
def _tvm_onnx_import(direction, chunk, dtype):
    compiled = gspn_tvm.compile_onnx(export.scan_model(direction, chunk, dtype))
    return lambda feeds: compiled(*(torch.from_numpy(a) for a in feeds.values())).numpy()


BACKENDS = [
    Backend("reference", gspn_scan_ref, True, (torch.float32, torch.float16, torch.bfloat16)),
    Backend("tvm-cpu", _tvm_differentiable, True, (torch.float32, torch.float16, torch.bfloat16)),
    Backend("tvm-cuda", _tvm_differentiable, True, (torch.float32, torch.float16, torch.bfloat16), device="cuda"),
    Backend("ort-custom", _numpy_to_torch(_ort_custom), False, (torch.float32, torch.float16)),
    Backend("ort-portable", _numpy_to_torch(_ort_portable), False, (torch.float32, torch.float16)),
    Backend("onnx-reference", _numpy_to_torch(_onnx_reference), False, (torch.float32,), max_examples=10),
    Backend("tvm-onnx-import", _numpy_to_torch(_tvm_onnx_import), False, (torch.float32,), max_examples=6),
]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request) -> Backend:
    return skip_unless_available(request.param)


def test_matches_reference(backend):
    """Output (and gradients of all five inputs, where the backend has a backward) on drawn inputs."""
    assert_scan_matches(backend.forward, backward=backend.backward, dtypes=backend.dtypes,
                        max_examples=backend.max_examples, device=backend.device)  # fmt: skip


@pytest.mark.parametrize("case", [
    ScanCase(1, 1, 1, 1, 1, "t2b", 0), ScanCase(1, 2, 1, 1, 7, "l2r", 0), ScanCase(1, 2, 2, 7, 1, "b2t", 2),
    ScanCase(2, 6, 3, 5, 9, "r2l", 4), ScanCase(1, 4, 2, 9, 4, "t2b", 3),
], ids=str)  # fmt: skip
def test_edge_shapes(backend, case):
    """1x1, single-row and single-column maps, chunks not dividing the line count, groups."""
    for dtype in backend.dtypes:
        check_scan_case(backend.forward, case, dtype, backward=backend.backward, device=backend.device)


@pytest.mark.parametrize("direction", ["t2b", "b2t", "l2r", "r2l"])
def test_long_lines_and_strips(backend, direction):
    """Lines longer than a vector, widths not a multiple of any strip or tile (16, 64, 128), groups,
    unnormalized weights and a chunk that does not divide the line count."""
    case = ScanCase(2, 6, 3, 37, 139, direction, 9)
    for dtype in backend.dtypes:
        check_scan_case(backend.forward, case, dtype, backward=backend.backward, device=backend.device,
                        seed=5, normalized=False)  # fmt: skip


@pytest.mark.parametrize("direction", ["t2b", "b2t", "l2r", "r2l"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_constant_propagation(backend, direction, chunk):
    """Normalized weights, lam = x = 1: line s holds s + 1 ((s mod chunk) + 1), a value no
    implementation computes for the test: it follows from the row sums being 1."""
    B, C, G, H, W = 1, 4, 2, 7, 6
    dtype = backend.dtypes[0]
    logits = torch.randn(3, B, G, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gl, gm, gr = (w.to(dtype) for w in normalize_weights(*logits, direction))
    ones = torch.ones(B, C, H, W, dtype=dtype)
    with torch.no_grad():
        h = backend.forward(ones, ones, gl, gm, gr, direction, chunk).double()
    n_lines = line_count(direction, H, W)
    s = torch.arange(n_lines, dtype=torch.float64)
    if direction in ("b2t", "r2l"):
        s = s.flip(0)
    value = (s % chunk if chunk else s) + 1
    expected = (value.view(1, 1, 1, n_lines) if direction in ("l2r", "r2l") else value.view(1, 1, n_lines, 1))
    assert_close_scaled(h, expected.expand(B, C, H, W), dtype, n_lines, f"{backend.name} constant propagation")


def test_out_of_line_weights_are_never_read(backend):
    """A weight whose neighbour lies outside the line contributes nothing, even inf or NaN."""
    case = ScanCase(1, 2, 2, 5, 6, "t2b", 0)
    for direction in ("t2b", "l2r"):
        case = case._replace(direction=direction)
        dtype = backend.dtypes[0]
        x, lam, gl, gm, gr = scan_inputs(case, dtype)
        expected = gspn_scan_ref(x, lam, gl, gm, gr, direction, 0)
        first = (..., 0, slice(None)) if direction in ("l2r", "r2l") else (..., slice(None), 0)
        last = (..., -1, slice(None)) if direction in ("l2r", "r2l") else (..., slice(None), -1)
        gl, gr = gl.clone(), gr.clone()
        gl[first], gr[last] = float("inf"), float("nan")
        with torch.no_grad():
            h = backend.forward(x, lam, gl, gm, gr, direction, 0)
        assert_close_scaled(h, expected, dtype, case.n_lines, f"{backend.name} {direction} with inf/nan off the line")


def test_original_code_vectors(backend):
    """The scans of the original GSPN code (l2r, float64 there; here in the backend's first dtype)."""
    for index, vector in enumerate(conformance_vectors()):
        dtype = backend.dtypes[0]
        inputs = [torch.from_numpy(vector[k]).to(dtype) for k in ("x", "lam", "gl", "gm", "gr")]
        with torch.no_grad():
            h = backend.forward(*inputs, "l2r", 0)
        expected = torch.from_numpy(vector["h"])
        assert_close_scaled(h, expected, dtype, expected.shape[-1], f"{backend.name} vector {index}")
