"""The registered operator gspn::scan: kernel, fake kernel, autograd, compile, export, bad inputs.

The operator's default kernel is the reference, so its values are held against oracles that share
no code with it: the per-element float64 recurrence of SPEC section 2 (``naive_scan_float64``), the
dense affinity matrix (a linear solve) and the original GSPN code's outputs (conformance vectors).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import gspn_ref
from helpers import FLOAT_DTYPES, assert_close_scaled, make_scan_inputs, naive_scan_float64, scan_cases
from hypothesis import given
from hypothesis import strategies as st

from gspn_ref import DIRECTIONS, GSPN, affinity_matrix, gspn_scan, gspn_scan_ref, line_count

CONFORMANCE = Path(gspn_ref.__file__).resolve().parent / "data" / "official_l2r_vectors.npz"


@given(case=scan_cases(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_operator_matches_spec_recurrence(case, dtype):
    """gspn_scan in every dtype against SPEC section 2 evaluated element by element in float64."""
    B, C, G, H, W, direction, chunk = case
    args = make_scan_inputs(B, C, G, H, W, dtype, direction=direction)
    h = gspn_scan(*args, direction, chunk)
    assert h.dtype == dtype and h.shape == (B, C, H, W) and h.is_contiguous()
    assert_close_scaled(h, naive_scan_float64(*args, direction, chunk), dtype, case.n_lines)


@pytest.mark.parametrize(
    "shape, direction, chunk",
    [((2, 4, 2, 4, 5), "t2b", 0), ((1, 3, 3, 5, 4), "b2t", 2), ((1, 2, 1, 3, 6), "l2r", 4), ((2, 2, 2, 6, 3), "r2l", 0),
     ((1, 2, 1, 1, 7), "l2r", 0), ((1, 2, 2, 7, 1), "t2b", 3)],
)  # fmt: skip
def test_operator_matches_dense_affinity(shape, direction, chunk):
    """SPEC section 2 matrix form: h == (I - M)^-1 diag(lam) x, M built position by position, one solve."""
    B, C, G, H, W = shape
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, torch.float64, seed=5, normalized=False, direction=direction)
    h = gspn_scan(x, lam, gl, gm, gr, direction, chunk)
    expected = (affinity_matrix(lam, gl, gm, gr, direction, chunk) @ x.flatten(2).unsqueeze(-1)).reshape(B, C, H, W)
    assert_close_scaled(h, expected, torch.float64, line_count(direction, H, W))


def test_operator_reproduces_the_original_code():
    """The original GSPN code's l2r outputs (tests/data, float64): agreement better than 1e-9."""
    data = np.load(CONFORMANCE)
    for k in range(4):
        x, lam, gl, gm, gr, expected = (torch.from_numpy(data[f"{k}_{n}"]) for n in ("x", "lam", "gl", "gm", "gr", "h"))
        h = gspn_scan(x, lam, gl, gm, gr, "l2r", 0)
        assert (h - expected).abs().max().item() < 1e-9, f"case {k} {tuple(x.shape)}"


def test_oracles_agree():
    """The test oracle itself: the element-wise recurrence equals the conformance vectors and the dense matrix."""
    data = np.load(CONFORMANCE)
    for k in range(4):
        x, lam, gl, gm, gr, expected = (torch.from_numpy(data[f"{k}_{n}"]) for n in ("x", "lam", "gl", "gm", "gr", "h"))
        assert (naive_scan_float64(x, lam, gl, gm, gr, "l2r") - expected).abs().max().item() < 1e-9
    for direction in DIRECTIONS:
        for chunk in (0, 2):
            x, lam, gl, gm, gr = make_scan_inputs(1, 4, 2, 4, 5, torch.float64, seed=9, direction=direction)
            dense = (affinity_matrix(lam, gl, gm, gr, direction, chunk) @ x.flatten(2).unsqueeze(-1)).reshape(x.shape)
            torch.testing.assert_close(naive_scan_float64(x, lam, gl, gm, gr, direction, chunk), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [0, 2])
def test_weights_without_a_neighbour_are_never_read(direction, chunk):
    """SPEC section 2: a term whose neighbour is outside the line is zero whatever its weight holds."""
    B, C, G, H, W = 1, 4, 2, 5, 6
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, torch.float32, seed=11, direction=direction)
    expected = naive_scan_float64(x, lam, gl, gm, gr, direction, chunk)
    first, last = ((..., 0, slice(None)), (..., -1, slice(None))) if direction in ("l2r", "r2l") else ((..., 0), (..., -1))
    gl, gr = gl.clone(), gr.clone()
    gl[first], gr[last] = float("inf"), float("nan")
    # Lines that start a segment have no predecessor: none of their weights is read either.
    n_lines = line_count(direction, H, W)
    starts = [s for s in range(n_lines) if s == 0 or (chunk and s % chunk == 0)]
    for s in starts:
        line = n_lines - 1 - s if direction in ("b2t", "r2l") else s
        where = (..., line) if direction in ("l2r", "r2l") else (..., line, slice(None))
        for w in (gl, gm, gr):
            w[where] = float("inf")
    h = gspn_scan(x, lam, gl, gm, gr, direction, chunk)
    assert torch.isfinite(h).all()
    assert_close_scaled(h, expected, torch.float32, n_lines)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [0, 2])
def test_gradcheck_float64(direction, chunk):
    args = make_scan_inputs(2, 4, 2, 3, 5, torch.float64, direction=direction)
    inputs = [t.clone().requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *a: gspn_scan(*a, direction, chunk), inputs)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck_non_contiguous(direction):
    """Inputs that are transposed / sliced views still give correct gradients."""
    base = make_scan_inputs(1, 2, 2, 6, 4, torch.float64, direction=direction)
    views = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in base[:2]]
    views += [torch.cat([w, w], dim=-1)[..., ::2] for w in base[2:]]
    assert not views[0].is_contiguous() and not views[2].is_contiguous()
    inputs = [t.detach().requires_grad_() for t in views]
    assert torch.autograd.gradcheck(lambda *a: gspn_scan(*a, direction, 3), inputs)


@pytest.mark.parametrize("direction", ["t2b", "r2l"])
def test_opcheck(direction):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    for dtype, shape in ((torch.float32, (2, 4, 2, 5, 3)), (torch.float64, (1, 3, 3, 1, 4))):
        x, lam, gl, gm, gr = make_scan_inputs(*shape, dtype, direction=direction)
        args = (x.requires_grad_(), lam.requires_grad_(), gl.requires_grad_(), gm, gr, direction, 2)
        torch.library.opcheck(torch.ops.gspn.scan.default, args)
        h = gspn_scan_ref(*(t.detach() for t in args[:5]), direction, 2)
        torch.library.opcheck(torch.ops.gspn.scan_backward.default, (torch.randn_like(h), *(t.detach() for t in args[:5]), h, direction, 2))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = GSPN(8, d_proxy=4, groups=4, chunk=3).eval()
    x = torch.randn(2, 8, 7, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
    x.requires_grad_()
    compiled(x).sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(g_compiled, x.grad)


def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(1)
    layer = GSPN(4, d_proxy=4).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_torch_export_keeps_one_scan_node_per_direction(fused):
    """One gspn::fused_scan per direction (fused layer) or one gspn::scan (fused=False), at any size."""
    torch.manual_seed(0)
    layer = GSPN(8, d_proxy=4, directions=("t2b", "b2t", "l2r", "r2l"), fused=fused).eval()
    x = torch.randn(2, 8, 6, 9)  # sizes 0 and 1 would be specialized by torch.export
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    program = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: batch, 2: height, 3: width}})
    op, other = torch.ops.gspn.fused_scan.default, torch.ops.gspn.scan.default
    if not fused:
        op, other = other, op
    scans = [n for n in program.graph.nodes if n.op == "call_function" and n.target == op]
    assert [n.args[-2] for n in scans] == list(layer.directions)
    assert not [n for n in program.graph.nodes if n.op == "call_function" and n.target == other]
    x2 = torch.randn(3, 8, 11, 4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), layer(x2))


def valid_args():
    return list(make_scan_inputs(1, 4, 2, 3, 5, torch.float32)) + ["t2b", 0]


def with_arg(index, value):
    args = valid_args()
    args[index] = value
    return args


BAD_INPUTS = [
    # (args, exception, words the message must contain)
    (with_arg(0, torch.randn(4, 3, 5)), ValueError, ["x", "4-D", "(4, 3, 5)"]),
    (with_arg(1, torch.randn(1, 4, 3, 6)), ValueError, ["lam", "(1, 4, 3, 5)", "(1, 4, 3, 6)"]),
    (with_arg(3, torch.rand(1, 2, 4, 5)), ValueError, ["gm", "(1, 2, 4, 5)"]),
    (with_arg(2, torch.rand(1, 3, 3, 5)), ValueError, ["gm", "(1, 3, 3, 5)", "G from gl"]),
    ([*valid_args()[:2], *(torch.rand(1, 3, 3, 5) for _ in range(3)), "t2b", 0], ValueError, ["G", "divides C = 4", "G = 3"]),
    (with_arg(5, "up"), ValueError, ["direction", "t2b", "'up'"]),
    (with_arg(5, 3), TypeError, ["direction", "int"]),
    (with_arg(6, -1), ValueError, ["chunk", ">= 0", "-1"]),
    (with_arg(6, 1.5), TypeError, ["chunk", "float"]),
    (with_arg(1, torch.ones(1, 4, 3, 5, dtype=torch.float64)), TypeError, ["lam", "float32", "float64"]),
    (with_arg(0, torch.ones(1, 4, 3, 5, dtype=torch.int64)), TypeError, ["x", "floating", "int64"]),
    (with_arg(4, torch.ones(1, 2, 3, 5, dtype=torch.int32)), TypeError, ["gr", "int32"]),
    (with_arg(4, torch.ones(1, 2, 3, 5, device="meta")), ValueError, ["gr", "device", "meta"]),
    (with_arg(2, [[1.0]]), TypeError, ["gl", "Tensor", "list"]),
    ([torch.ones(1, 4, 0, 5)] * 2 + [torch.ones(1, 2, 0, 5)] * 3 + ["t2b", 0], ValueError, ["x", ">= 1", "(1, 4, 0, 5)"]),
]


@pytest.mark.parametrize("args, exc, words", BAD_INPUTS, ids=[f"bad{i}" for i in range(len(BAD_INPUTS))])
@pytest.mark.parametrize("entry", [gspn_scan, gspn_scan_ref], ids=["gspn_scan", "gspn_scan_ref"])
def test_bad_inputs_raise_named_errors(entry, args, exc, words):
    with pytest.raises(exc) as info:
        entry(*args)
    message = str(info.value)
    print(message)
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"
