"""The compiled CPU kernels write exactly their outputs: guard regions around every output stay intact.

Outputs are views into larger buffers filled with a sentinel; a kernel that writes past a tile or a
line (tails where the line count is not a multiple of a schedule's tile) changes a guard.
"""

import math

import torch
from helpers import assert_close_scaled, make_scan_inputs, scan_cases
from hypothesis import given
from hypothesis import strategies as st

from gspn_ref import gspn_scan_backward_ref, gspn_scan_ref
from gspn_tvm import compute, kernels

GUARD = 4096
SENTINEL = 12345.0


def guarded_empty(shape, dtype):
    """``(view, storage)``: a contiguous view of ``shape`` with ``GUARD`` sentinels on each side."""
    n = math.prod(shape)
    storage = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype)
    return storage[GUARD : GUARD + n].view(shape), storage


def assert_guards_intact(storage, what):
    head, tail = storage[:GUARD], storage[-GUARD:]
    assert (head == SENTINEL).all() and (tail == SENTINEL).all(), f"{what}: kernel wrote outside its output"


@given(case=scan_cases(max_side=40), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_forward_and_adjoint_stay_inside_their_outputs(case, dtype):
    B, C, G, H, W, direction, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, dtype, direction=direction)
    lib = kernels.library("cpu", dtype)

    h, h_storage = guarded_empty(x.shape, dtype)
    lib[compute.forward_name(direction)](x, lam, gl, gm, gr, h, chunk)
    assert_guards_intact(h_storage, "h")
    assert_close_scaled(h, gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk), dtype, case.n_lines, "h")

    gh = torch.randn_like(x)
    grads = [guarded_empty(t.shape, dtype) for t in (x, lam, gl, gm, gr)]
    lib[compute.backward_name(direction)](gh, x, lam, gl, gm, gr, h, *(g for g, _ in grads), chunk)
    expected = gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, chunk)
    terms = [case.n_lines] * 2 + [case.n_lines * C // G] * 3
    for name, (grad, storage), e, n in zip(("dx", "dlam", "dgl", "dgm", "dgr"), grads, expected, terms):
        assert_guards_intact(storage, name)
        assert_close_scaled(grad, e, dtype, n, name)
