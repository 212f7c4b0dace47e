"""SPEC section 5, properties 1-8 and the conformance vectors, on the reference scan."""

from pathlib import Path

import numpy as np
import pytest
import torch

import gspn_ref
from helpers import (
    FLOAT_DTYPES,
    assert_close_scaled,
    make_scan_inputs,
    poison_unread_weights,
    scan_cases,
    scan_order_of_line,
    scan_tolerance,
)
from hypothesis import given
from hypothesis import strategies as st

from gspn_ref import (
    DIRECTIONS,
    affinity_matrix,
    gspn_scan_backward_ref,
    gspn_scan_ref,
    is_column,
    is_reversed,
    normalize_weights,
)

# Outputs of the original GSPN code (shared/conformance/README.md): a copy travels with the tests so
# that a clone runs them anywhere; where the project's shared/ folder sits beside the clone, the copy
# must still equal it.
CONFORMANCE = Path(gspn_ref.__file__).resolve().parent / "data" / "official_l2r_vectors.npz"


def broadcast_scan_index(direction, H, W, chunk=0):
    s = scan_order_of_line(direction, H, W).reshape(H, W).double()
    return torch.remainder(s, chunk) if chunk else s


@given(case=scan_cases(max_side=12), dtype=st.sampled_from(FLOAT_DTYPES))
def test_constant_propagation(case, dtype):
    """Property 1: normalized weights, lam = x = 1 give h_s = (s mod chunk) + 1."""
    B, C, G, H, W, direction, chunk = case
    _, _, gl, gm, gr = make_scan_inputs(B, C, G, H, W, dtype, direction=direction)
    ones = torch.ones(B, C, H, W, dtype=dtype)
    h = gspn_scan_ref(ones, ones, gl, gm, gr, direction, chunk)
    expected = (broadcast_scan_index(direction, H, W, chunk) + 1).expand(B, C, H, W)
    assert h.dtype == dtype
    assert_close_scaled(h, expected, dtype, case.n_lines)


@given(case=scan_cases(max_side=16), dtype=st.sampled_from(FLOAT_DTYPES))
def test_bounded_growth_small(case, dtype):
    """Property 2 on drawn shapes: |lam * x| <= 1 gives |h_s| <= s + 1."""
    B, C, G, H, W, direction, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, dtype, direction=direction, seed=H * W)
    x, lam = torch.tanh(x), torch.tanh(lam)
    h = gspn_scan_ref(x, lam, gl, gm, gr, direction, 0)
    bound = broadcast_scan_index(direction, H, W) + 1
    slack = scan_tolerance(dtype, case.n_lines)
    assert (h.double().abs() <= bound * (1 + slack)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("direction", ["t2b", "l2r"])
def test_bounded_growth_4096(dtype, direction):
    """Property 2 at full size: 4096 lines of 4096 positions stay within s + 1 (sign-aligned worst case)."""
    H = W = 4096
    x, lam, gl, gm, gr = make_scan_inputs(1, 1, 1, H, W, dtype, direction=direction, seed=7)
    ones = torch.ones_like(x)
    h = gspn_scan_ref(ones, ones, gl, gm, gr, direction)
    bound = broadcast_scan_index(direction, H, W) + 1
    # Normalized weights sum to 1 only up to rounding: the bound holds up to the scan tolerance.
    slack = scan_tolerance(dtype, H)
    assert torch.isfinite(h).all()
    ratio = (h.double().abs() / bound).max().item()
    print(f"max |h_s| / (s + 1) = {ratio:.8f}, allowed {1 + slack:.8f}")
    assert ratio <= 1 + slack
    assert h.double().abs().max() >= 0.99 * 4096  # lam = x = 1: growth is linear, not damped


def test_unnormalized_weights_blow_up():
    """Property 2, the other side: raw sigmoid weights grow exponentially; normalized ones do not."""
    H, W = 200, 32
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 1, H, W, generator=gen)
    ones = torch.ones(1, 1, H, W)
    raw = gspn_scan_ref(ones, ones, *torch.sigmoid(logits), "t2b")
    normalized = gspn_scan_ref(ones, ones, *normalize_weights(*logits, "t2b"), "t2b")
    print(f"max |h|: raw {raw.abs().max():.3e}, normalized {normalized.abs().max():.3e}")
    assert not torch.isfinite(raw).all() or raw.abs().max() > 1e20
    assert normalized.abs().max() <= H * (1 + 1e-5)


@given(case=scan_cases(), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linearity_and_elementwise_gate(case, a, b):
    """Property 3: linear in x; lam acts element-wise (scan(x, lam) == scan(lam * x, 1))."""
    B, C, G, H, W, direction, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, torch.float64, direction=direction)
    x2 = torch.randn_like(x)
    lhs = gspn_scan_ref(a * x + b * x2, lam, gl, gm, gr, direction, chunk)
    rhs = a * gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk) + b * gspn_scan_ref(x2, lam, gl, gm, gr, direction, chunk)
    assert_close_scaled(lhs, rhs, torch.float64, case.n_lines, "linearity")
    gated = gspn_scan_ref(lam * x, torch.ones_like(lam), gl, gm, gr, direction, chunk)
    assert_close_scaled(gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk), gated, torch.float64, case.n_lines, "gate")


@given(case=scan_cases(max_side=6), normalized=st.booleans())
def test_matrix_form(case, normalized):
    """Property 4: h == A x, and A is block lower-triangular in scan order."""
    B, C, G, H, W, direction, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, torch.float64, normalized=normalized, direction=direction)
    h = gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)
    A = affinity_matrix(lam, gl, gm, gr, direction, chunk)
    assert A.shape == (B, C, H * W, H * W)
    assert_close_scaled(h.flatten(2), (A @ x.flatten(2).unsqueeze(-1)).squeeze(-1), torch.float64, case.n_lines)
    order = scan_order_of_line(direction, H, W)
    later = order.unsqueeze(1) < order.unsqueeze(0)  # [n, m]: input m's line is scanned after output n's
    assert (A[..., later] == 0).all()


def flip_h(t):
    return t.flip(-2)


def transpose_hw(t):
    return t.transpose(-1, -2)


@given(case=scan_cases())
def test_direction_symmetry(case):
    """Property 5: b2t, l2r and r2l are t2b on flipped / transposed inputs, mapped back."""
    B, C, G, H, W, _, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, torch.float64, normalized=False)
    args = (x, lam, gl, gm, gr)

    def via_t2b(to_frame, from_frame):
        return from_frame(gspn_scan_ref(*(to_frame(t) for t in args), "t2b", chunk))

    expected = {
        "t2b": gspn_scan_ref(*args, "t2b", chunk),
        "b2t": via_t2b(flip_h, flip_h),
        "l2r": via_t2b(transpose_hw, transpose_hw),
        "r2l": via_t2b(lambda t: flip_h(transpose_hw(t)), lambda t: transpose_hw(flip_h(t))),
    }
    for direction in DIRECTIONS:
        torch.testing.assert_close(gspn_scan_ref(*args, direction, chunk), expected[direction], rtol=0, atol=0)


@given(case=scan_cases(max_side=12))
def test_chunking_is_independent_segments(case):
    """Property 6: chunk = k equals independent scans of each k-line segment (in scan order)."""
    B, C, G, H, W, direction, chunk = case
    chunk = max(chunk, 1)
    args = make_scan_inputs(B, C, G, H, W, torch.float64, normalized=False, direction=direction)
    h = gspn_scan_ref(*args, direction, chunk)
    n_lines = case.n_lines
    axis = -1 if is_column(direction) else -2
    expected = torch.empty_like(h)
    for start in range(0, n_lines, chunk):
        s = torch.arange(start, min(start + chunk, n_lines))
        lines = n_lines - 1 - s if is_reversed(direction) else s
        lines = lines.sort().values
        segment = [t.index_select(axis, lines) for t in args]
        expected.index_copy_(axis, lines, gspn_scan_ref(*segment, direction, 0))
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


@given(case=scan_cases(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_groups_equal_repeated_weights(case, dtype):
    """Property 7: G weight groups equal per-channel weights repeated C // G times."""
    B, C, G, H, W, direction, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, dtype, direction=direction)
    grouped = gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)
    per_channel = gspn_scan_ref(x, lam, *(w.repeat_interleave(C // G, dim=1) for w in (gl, gm, gr)), direction, chunk)
    torch.testing.assert_close(grouped, per_channel, rtol=0, atol=0)


@given(case=scan_cases(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_adjoint_equals_autograd(case, dtype):
    """Property 8: the adjoint scan equals autograd through the reference forward."""
    B, C, G, H, W, direction, chunk = case
    inputs = [t.requires_grad_() for t in make_scan_inputs(B, C, G, H, W, dtype, direction=direction)]
    h = gspn_scan_ref(*inputs, direction, chunk)
    gh = torch.randn_like(h)
    auto = torch.autograd.grad(h, inputs, gh, allow_unused=True, materialize_grads=True)
    adjoint = gspn_scan_backward_ref(gh, *(t.detach() for t in inputs), h.detach(), direction, chunk)
    terms = [case.n_lines] * 2 + [case.n_lines * C // G] * 3
    for name, a, e, n in zip(("dx", "dlam", "dgl", "dgm", "dgr"), adjoint, auto, terms):
        assert a.dtype == dtype
        assert_close_scaled(a, e, dtype, n, name)


def test_official_conformance_vectors():
    """The reference reproduces the original GSPN code's l2r outputs (float64, < 1e-9)."""
    data = np.load(CONFORMANCE)
    for k in range(4):
        x, lam, gl, gm, gr, h = (torch.from_numpy(data[f"{k}_{n}"]) for n in ("x", "lam", "gl", "gm", "gr", "h"))
        ours = gspn_scan_ref(x, lam, gl, gm, gr, "l2r")
        err = (ours - h).abs().max().item()
        print(f"case {k} {tuple(x.shape)}: max |diff| {err:.2e}")
        assert err < 1e-9


@given(case=scan_cases(max_side=9), poison=st.sampled_from([float("inf"), float("-inf"), float("nan")]))
def test_unread_weights_may_hold_anything(case, poison):
    """SPEC section 2: a term whose neighbour is outside the line, or on a segment start, is zero
    whatever its weight holds (inf or NaN there must not turn outputs into NaN); section 4: the
    gradients of those weights are exactly zero, even where the adjoint is infinite."""
    B, C, G, H, W, direction, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, torch.float64, direction=direction)
    poisoned, zeroed, first, last, starts = poison_unread_weights(gl, gm, gr, direction, chunk, poison)
    h = gspn_scan_ref(x, lam, *poisoned, direction, chunk)
    expected = gspn_scan_ref(x, lam, *zeroed, direction, chunk)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, expected, rtol=0, atol=0)
    gh = torch.randn_like(x)
    grads = gspn_scan_backward_ref(gh, x, lam, *poisoned, h, direction, chunk)
    expected_grads = gspn_scan_backward_ref(gh, x, lam, *zeroed, expected, direction, chunk)
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # an infinite output gradient: d is infinite, yet out-of-line weight gradients stay exactly 0
    gh_inf = gh.clone()
    gh_inf[..., -1, -1] = float("inf")
    _, _, dgl, dgm, dgr = gspn_scan_backward_ref(gh_inf, x, lam, *zeroed, expected, direction, chunk)
    assert (dgl[..., first | starts] == 0).all() and (dgr[..., last | starts] == 0).all()
    assert (dgm[..., starts] == 0).all()
