"""The compiled CPU kernels stay inside their bounds, in memory and in meaning.

Memory: outputs are views into larger buffers filled with a sentinel; a kernel that writes past a
tile or a line (tails where the line count is not a multiple of a schedule's tile) changes a guard.
Meaning (issue 8): ``chunk`` is a 64-bit integer all the way into the compiled code; weights that
SPEC section 2 never reads may hold inf or NaN; the compiled functions themselves reject group
counts that would divide by zero or read past the weights, and so does ``torch.ops.gspn.scan``
with the TVM kernels enabled. Calls that crashed the process before the fixes run in a subprocess.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_close_scaled, make_scan_inputs, scan_cases
from hypothesis import given
from hypothesis import strategies as st
from helpers import poison_unread_weights

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


@pytest.mark.parametrize("direction", ["t2b", "l2r", "r2l"])
@pytest.mark.parametrize("chunk", [2**32 + 1, 2**31 + 1, 2**63 - 1])
def test_chunk_is_64_bit(direction, chunk):
    """A chunk beyond int32 is not truncated (2**32 + 1 used to scan as chunk = 1): any chunk of at
    least the line count is one segment, like chunk = 0; both through the torch-facing kernel and
    straight into the compiled function."""
    x, lam, gl, gm, gr = make_scan_inputs(1, 2, 1, 5, 6, torch.float32, direction=direction)
    one_segment = gspn_scan_ref(x, lam, gl, gm, gr, direction, 0)
    restart_every_line = gspn_scan_ref(x, lam, gl, gm, gr, direction, 1)
    assert not torch.allclose(one_segment, restart_every_line)  # the check below can tell them apart
    assert_close_scaled(kernels.scan_forward(x, lam, gl, gm, gr, direction, chunk), one_segment, torch.float32, 6, "h")
    h = torch.empty_like(x)
    kernels.library("cpu", torch.float32)[compute.forward_name(direction)](x, lam, gl, gm, gr, h, chunk)
    assert_close_scaled(h, one_segment, torch.float32, 6, "h (compiled function)")
    grads = [torch.empty_like(t) for t in (x, lam, gl, gm, gr)]
    gh = torch.randn_like(x)
    kernels.library("cpu", torch.float32)[compute.backward_name(direction)](gh, x, lam, gl, gm, gr, one_segment, *grads, chunk)
    expected = gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, one_segment, direction, 0)
    for name, got, want in zip(("dx", "dlam", "dgl", "dgm", "dgr"), grads, expected):
        assert_close_scaled(got, want, torch.float32, 12, name)


@pytest.mark.parametrize("chunk, error, match", [(2**63, ValueError, "chunk: expected an int <= 2"), (2**64 + 1, ValueError, "chunk:"),
                                                 (1.0, TypeError, "chunk: expected an int"), (True, TypeError, "chunk:"),
                                                 (torch.tensor(3), TypeError, "chunk:"), (-1, ValueError, "chunk: expected an int >= 0")])
def test_chunk_outside_int64_or_not_an_int_is_rejected(chunk, error, match):
    x, lam, gl, gm, gr = make_scan_inputs(1, 2, 1, 3, 4, torch.float32)
    with pytest.raises(error, match=match):
        kernels.scan_forward(x, lam, gl, gm, gr, "t2b", chunk)
    with pytest.raises(error, match=match):
        kernels.scan_backward(torch.ones_like(x), x, lam, gl, gm, gr, x, "t2b", chunk)


@given(case=scan_cases(max_side=9), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       poison=st.sampled_from([float("inf"), float("-inf"), float("nan")]))
def test_unread_weights_may_hold_anything(case, dtype, poison):
    """SPEC section 2: gl at p = 0, gr at p = P - 1 and every weight of a segment-start line are
    never read: inf or NaN there (the zero halo used to multiply them into NaN) changes nothing, in
    the forward scan and in the adjoint, whose gradients for those weights are exactly 0."""
    B, C, G, H, W, direction, chunk = case
    x, lam, gl, gm, gr = make_scan_inputs(B, C, G, H, W, dtype, direction=direction)
    poisoned, _, first, last, starts = poison_unread_weights(gl, gm, gr, direction, chunk, poison)
    h = kernels.scan_forward(x, lam, *poisoned, direction, chunk)
    expected = gspn_scan_ref(x, lam, *poisoned, direction, chunk)
    assert torch.isfinite(h.float()).all(), "h: a weight that is never read leaked into the output"
    assert_close_scaled(h, expected, dtype, case.n_lines, "h")
    gh = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = kernels.scan_backward(gh, x, lam, *poisoned, expected, direction, chunk)
    expected_grads = gspn_scan_backward_ref(gh, x, lam, *poisoned, expected, direction, chunk)
    for name, got, want in zip(("dx", "dlam", "dgl", "dgm", "dgr"), grads, expected_grads):
        assert torch.isfinite(got.float()).all(), f"{name}: not finite"
        assert_close_scaled(got, want, dtype, case.n_lines * (C // G if name.startswith("dg") else 1), name)
    gh[..., -1, -1] = float("inf")  # the adjoint becomes infinite; unread weights still get 0
    _, _, dgl, dgm, dgr = kernels.scan_backward(gh, x, lam, *poisoned, expected, direction, chunk)
    assert (dgl[..., first | starts] == 0).all() and (dgr[..., last | starts] == 0).all() and (dgm[..., starts] == 0).all()


CRASH_PRONE = """
import torch, gspn_tvm
from gspn_tvm import compute, kernels
gspn_tvm.enable()
lib = kernels.library("cpu", torch.float32)
for C, G in ((1, 2), (3, 2), (2, 4)):
    x, w = torch.randn(1, C, 4, 5), torch.rand(1, G, 4, 5)
    for direction in ("t2b", "l2r"):
        try:
            torch.ops.gspn.scan(x, x, w, w, w, direction, 0)
            print("NO ERROR op forward", C, G)
        except ValueError as error:
            assert str(error).startswith("gl:"), error
        try:
            torch.ops.gspn.scan_backward(x, x, x, w, w, w, x, direction, 0)
            print("NO ERROR op backward", C, G)
        except ValueError as error:
            assert str(error).startswith("gl:"), error
        try:
            lib[compute.forward_name(direction)](x, x, w, w, w, torch.empty_like(x), 0)
            print("NO ERROR compiled forward", C, G)
        except RuntimeError as error:
            assert "gl: expected a group count G that divides C" in str(error), error
        try:
            grads = [torch.empty_like(t) for t in (x, x, w, w, w)]
            lib[compute.backward_name(direction)](x, x, x, w, w, w, x, *grads, 0)
            print("NO ERROR compiled backward", C, G)
        except RuntimeError as error:
            assert "gl: expected a group count G that divides C" in str(error), error
print("DONE")
"""


def test_bad_group_counts_are_rejected_without_a_crash():
    """G > C used to kill the process with SIGFPE and G not dividing C read past the weights, both
    through ``torch.ops.gspn.scan`` with the TVM kernels enabled and in the compiled functions."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH_PRONE)], capture_output=True, text=True,
                            cwd=root, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode} (negative: signal): {result.stderr[-2000:]}"
    assert "NO ERROR" not in result.stdout and result.stdout.strip().endswith("DONE"), result.stdout


SOAK = """
import json, sys, torch
from gspn_tvm import kernels, soak
if sys.argv[1] == "leak":  # a kernel that keeps every output it returns
    kept, real_forward = [], kernels.scan_forward
    kernels.scan_forward = lambda *args: kept.append(real_forward(*args)) or kept[-1]
print(json.dumps(soak.soak(calls=150, warmup=10)))
"""


def _soak_in_fresh_process(mode: str) -> list[dict]:
    # A fresh process: in a long-lived one, memory freed by earlier tests would absorb a leak.
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SOAK), mode], capture_output=True, text=True,
                            cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_kernels_keep_resident_memory_flat():
    """Part 3 of issue 8 with a modest count (the benchmark runs ``gspn_tvm.soak.main`` with 2000)."""
    rows = _soak_in_fresh_process("clean")
    print(rows)
    assert len(rows) == 8
    over = [row for row in rows if not row["within_bound"]]
    assert not over, f"resident memory grew beyond the bound of gspn_tvm.soak: {over}"


def test_soak_detects_a_leaking_kernel():
    """The soak can fail: a kernel that keeps every output (~200 KiB a call) is over the bound."""
    rows = _soak_in_fresh_process("leak")
    assert not next(row for row in rows if row["kernel"] == "forward_t2b")["within_bound"]
    assert next(row for row in rows if row["kernel"] == "backward_t2b")["within_bound"]
