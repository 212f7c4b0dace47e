"""One conformance suite over every backend of the fused scan ``gspn::fused_scan`` (the fused
counterpart of tests/backends/test_conformance.py): each backend supplies its forward, whether it
is differentiable, and its dtypes; the same properties run over all of them, through the public
API ``gspn_ref.testing`` (``assert_fused_scan_matches``, ``check_fused_case``).

Backends: the reference, the operator ``torch.ops.gspn.fused_scan`` (whatever kernel is registered),
the TVM CPU kernels (and CUDA kernels, with a GPU), the ONNX Runtime custom operator
``gspn::GSPNFusedScan``, the portable ONNX form (Scan loop and unrolled) in ONNX Runtime and in
``onnx.reference``, and TVM's ONNX importer (``gspn_tvm.compile_onnx``).
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
from gspn_ref import gspn_fused_scan_ref, line_count
from gspn_ref.testing import (
    ScanCase,
    assert_close_scaled,
    assert_fused_scan_matches,
    check_fused_case,
    fused_inputs,
)


def _operator(u, lam, al, am, ar, gate, skip, direction, chunk):
    return torch.ops.gspn.fused_scan(u, lam, al, am, ar, gate, skip, direction, chunk)


def _numpy_to_torch(make_runner, *, static_shape: bool = False):
    """A backend forward from ``make_runner(direction, chunk, dtype[, shape]) -> run(feeds)``;
    ``static_shape`` passes (B, C, G, H, W) for models that fix their sizes."""

    @functools.wraps(make_runner)
    def run(u, lam, al, am, ar, gate, skip, direction, chunk):
        key = (direction, chunk, str(u.dtype).replace("torch.", ""))
        if static_shape:
            key += ((u.shape[0], u.shape[1], al.shape[1], u.shape[2], u.shape[3]),)
        out = make_runner(*key)(export.fused_scan_feeds(u, lam, al, am, ar, gate, skip))
        return torch.from_numpy(np.ascontiguousarray(out))

    return run


def _ort_runner(model):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


@functools.lru_cache(maxsize=None)
def _ort_custom(direction, chunk, dtype):
    session = export.session(export.fused_scan_model(direction, chunk, dtype))
    return lambda feeds: session.run(None, feeds)[0]


@functools.lru_cache(maxsize=None)
def _ort_portable(direction, chunk, dtype):
    return _ort_runner(export.fused_scan_model(direction, chunk, dtype, mode="portable"))


@functools.lru_cache(maxsize=None)
def _ort_portable_unrolled(direction, chunk, dtype, shape):
    return _ort_runner(export.fused_scan_model(direction, chunk, dtype, mode="portable-unrolled", shape=shape))


@functools.lru_cache(maxsize=None)
def _onnx_reference(direction, chunk, dtype):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(export.fused_scan_model(direction, chunk, dtype, mode="portable"))
    return lambda feeds: evaluator.run(None, feeds)[0]


_tvm_differentiable = tvm_differentiable(torch.ops.gspn.fused_scan, torch.ops.gspn.fused_scan_backward, backward_takes_output=False)


@functools.lru_cache(maxsize=None)
def _tvm_onnx_import(direction, chunk, dtype):
    compiled = gspn_tvm.compile_onnx(export.fused_scan_model(direction, chunk, dtype))
    return lambda feeds: compiled(*(torch.from_numpy(a) for a in feeds.values())).numpy()


HALF = (torch.float32, torch.float16, torch.bfloat16)

BACKENDS = [
    Backend("reference", gspn_fused_scan_ref, True, HALF),
    Backend("operator", _operator, True, HALF),
    Backend("ort-custom", _numpy_to_torch(_ort_custom), False, (torch.float32, torch.float16)),
    Backend("ort-portable", _numpy_to_torch(_ort_portable), False, (torch.float32, torch.float16)),
    Backend("ort-portable-unrolled", _numpy_to_torch(_ort_portable_unrolled, static_shape=True), False,
            (torch.float32, torch.float16), max_examples=8),  # fmt: skip
    Backend("onnx-reference", _numpy_to_torch(_onnx_reference), False, (torch.float32,), max_examples=8),
    Backend("tvm-cpu", _tvm_differentiable, True, HALF),
    Backend("tvm-cuda", _tvm_differentiable, True, HALF, device="cuda"),
    Backend("tvm-onnx-import", _numpy_to_torch(_tvm_onnx_import), False, (torch.float32,), max_examples=6),
]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request) -> Backend:
    return skip_unless_available(request.param)


def test_matches_reference(backend):
    """Output (and the seven gradients, where the backend has a backward) on drawn inputs."""
    assert_fused_scan_matches(backend.forward, backward=backend.backward, dtypes=backend.dtypes,
                              max_examples=backend.max_examples, device=backend.device)  # fmt: skip


@pytest.mark.parametrize("case", [
    ScanCase(1, 1, 1, 1, 1, "t2b", 0), ScanCase(1, 2, 1, 1, 7, "l2r", 0), ScanCase(1, 2, 2, 7, 1, "b2t", 2),
    ScanCase(2, 6, 3, 5, 9, "r2l", 4), ScanCase(1, 4, 2, 9, 4, "t2b", 3), ScanCase(1, 3, 3, 1, 6, "t2b", 0),
], ids=str)  # fmt: skip
def test_edge_shapes(backend, case):
    """1x1 maps, one-position lines (gm = 1 after normalization), single-row and single-column maps,
    chunks not dividing the line count, groups."""
    for dtype in backend.dtypes:
        check_fused_case(backend.forward, case, dtype, backward=backend.backward, device=backend.device)


@pytest.mark.parametrize("direction", ["t2b", "b2t", "l2r", "r2l"])
def test_long_lines_saturated_logits(backend, direction):
    """Lines longer than a vector, widths not a multiple of any strip or tile, groups, a chunk not
    dividing the line count, and logits that saturate the sigmoid. In half precision the tolerance
    allows one rounding of y: weights or h rounded to the input dtype on the way would fail it."""
    case = ScanCase(2, 6, 3, 37, 139, direction, 9)
    for dtype in backend.dtypes:
        check_fused_case(backend.forward, case, dtype, backward=backend.backward, device=backend.device,
                         seed=5, logit_scale=8.0)  # fmt: skip


@pytest.mark.parametrize("direction", ["t2b", "b2t", "l2r", "r2l"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_constant_propagation(backend, direction, chunk):
    """u = lam = gate = 1, skip = 0.5, any logits: the normalized weights sum to 1 on every row, so
    line s holds s + 1 ((s mod chunk) + 1) plus the skip 0.5, a value no implementation computes
    for the test."""
    B, C, G, H, W = 1, 4, 2, 7, 6
    dtype = backend.dtypes[0]
    logits = torch.randn(3, B, G, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    al, am, ar = (a.to(dtype) for a in logits)
    ones = torch.ones(B, C, H, W, dtype=dtype)
    with torch.no_grad():
        y = backend.forward(ones, ones, al, am, ar, ones, ones * 0.5, direction, chunk).double()
    n_lines = line_count(direction, H, W)
    s = torch.arange(n_lines, dtype=torch.float64)
    if direction in ("b2t", "r2l"):
        s = s.flip(0)
    value = (s % chunk if chunk else s) + 1.5
    expected = value.view(1, 1, 1, n_lines) if direction in ("l2r", "r2l") else value.view(1, 1, n_lines, 1)
    assert_close_scaled(y, expected.expand(B, C, H, W), dtype, n_lines, f"{backend.name} constant propagation")


def test_out_of_line_logits_are_never_read(backend):
    """A logit whose neighbour lies outside the line (al at p = 0, ar at p = P-1) contributes
    nothing, even NaN, +inf or -inf: the result equals the reference on the original finite logits."""
    dtype = backend.dtypes[0]
    nan, inf = float("nan"), float("inf")
    for direction in ("t2b", "b2t", "l2r", "r2l"):
        case = ScanCase(1, 2, 2, 5, 6, direction, 0)
        for bad_l, bad_r in ((nan, inf), (-inf, nan)):
            u, lam, al, am, ar, gate, skip = fused_inputs(case, dtype, seed=2)
            expected = gspn_fused_scan_ref(*(t.double() for t in (u, lam, al, am, ar, gate, skip)), direction, 0)
            first = (..., 0, slice(None)) if direction in ("l2r", "r2l") else (..., slice(None), 0)
            last = (..., -1, slice(None)) if direction in ("l2r", "r2l") else (..., slice(None), -1)
            al, ar = al.clone(), ar.clone()
            al[first], ar[last] = bad_l, bad_r
            with torch.no_grad():
                y = backend.forward(u, lam, al, am, ar, gate, skip, direction, 0)
            what = f"{backend.name} {direction} with {bad_l}, {bad_r} off the line"
            assert_close_scaled(y, expected, dtype, case.n_lines, what)


@pytest.mark.parametrize("direction", ["b2t", "l2r"])
def test_normalization_floor(backend, direction):
    """All three logits at -30: every sigmoid is about 1e-13, their sum below the floor 1e-7, so
    the weights are s / 1e-7 (about 1e-6 each), not 1/3: the Max with the floor is taken."""
    case = ScanCase(1, 4, 2, 6, 5, direction, 0)
    dtype = backend.dtypes[0]
    u, lam, al, am, ar, gate, skip = fused_inputs(case, dtype, seed=7)
    al, am, ar = (torch.full_like(a, -30.0) for a in (al, am, ar))
    expected = gspn_fused_scan_ref(*(t.double() for t in (u, lam, al, am, ar, gate, skip)), direction, 0)
    # Without the floor the weights would be 1/3 each: far from the expected output.
    no_floor = torch.full_like(al, 0.0)
    unfloored = gspn_fused_scan_ref(*(t.double() for t in (u, lam, no_floor, no_floor, no_floor, gate, skip)),
                                    direction, 0)  # fmt: skip
    assert (unfloored - expected).abs().max() > 0.1
    with torch.no_grad():
        y = backend.forward(u, lam, al, am, ar, gate, skip, direction, 0)
    assert_close_scaled(y, expected, dtype, case.n_lines, f"{backend.name} {direction} below the floor")


@pytest.mark.parametrize("offset", [-9.0, -16.0])
def test_sigmoid_tails(backend, offset):
    """Logits far in the sigmoid's negative tail (offset plus noise), their sum above the floor:
    the weights are ratios of tiny sigmoids, so these must be accurate relative to their size (an
    approximate sigmoid, off by 1e-4 relative at -8 and 100% at -17, fails this)."""
    case = ScanCase(1, 4, 4, 6, 7, "r2l", 0)
    dtype = backend.dtypes[0]
    u, lam, al, am, ar, gate, skip = fused_inputs(case, dtype, seed=8, logit_scale=1.0)
    al, am, ar = (a + offset for a in (al, am, ar))
    expected = gspn_fused_scan_ref(*(t.double() for t in (u, lam, al, am, ar, gate, skip)), "r2l", 0)
    with torch.no_grad():
        y = backend.forward(u, lam, al, am, ar, gate, skip, "r2l", 0)
    assert_close_scaled(y, expected, dtype, case.n_lines, f"{backend.name} logits near {offset}")
