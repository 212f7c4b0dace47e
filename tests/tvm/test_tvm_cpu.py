"""TVM CPU kernels of gspn::scan: their registration, the layer with them, torch.compile, and the
kernels called directly against the reference (docs/operator.md; the cross-backend properties are in
tests/backends). Inputs, tolerances and shapes come from ``tests/helpers.py``; every comparison prints its largest
difference. The first run compiles one library per dtype (a few seconds each) into the kernel cache.
"""

from __future__ import annotations

import pytest
import torch

import gspn_ref
import gspn_tvm
from gspn_ref.testing import ScanCase, check_scan_case
from gspn_tvm import kernels
from helpers import assert_close_scaled, make_scan_inputs, naive_scan_float64

TVM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def tvm_enabled():
    gspn_tvm.enable()
    yield
    gspn_tvm.disable()


@pytest.mark.parametrize("direction", gspn_ref.DIRECTIONS)
@pytest.mark.parametrize(
    "shape, chunk",
    [((1, 1, 1, 1, 1), 0), ((2, 3, 3, 1, 9), 0), ((1, 2, 1, 9, 1), 2), ((2, 6, 2, 37, 35), 4), ((1, 4, 4, 70, 33), 33)],
)
@pytest.mark.parametrize("dtype", TVM_DTYPES)
def test_kernels_called_directly_at_tile_edges(direction, shape, chunk, dtype):
    """The compiled kernels themselves (not through the operator): H = 1, W = 1, odd sizes, maps
    wider and taller than a column tile and its 8x8 register blocks, chunk not dividing the lines."""
    check_scan_case(kernels.scan_forward, ScanCase(*shape, direction, chunk), dtype, backward=kernels.scan_backward)


#: Shapes the lane kernels serve (channels a multiple of 16, small planes; rows of 7 and 12 are not
#: whole vectors): a plane that is not a multiple of 8 elements (tail), a single row or column,
#: grouped weights whose groups span and split lane blocks, two batch items.
LANE_SHAPES = [((2, 32, 4, 5, 7), 2), ((1, 16, 16, 1, 9), 0), ((1, 48, 3, 9, 1), 3), ((2, 16, 1, 12, 12), 5)]


@pytest.mark.parametrize("direction", gspn_ref.DIRECTIONS)
@pytest.mark.parametrize("shape, chunk", LANE_SHAPES)
@pytest.mark.parametrize("dtype", TVM_DTYPES)
def test_lane_kernels_on_small_planes(direction, shape, chunk, dtype, monkeypatch):
    """Small planes of many channels run the lane kernels (channels as vector lanes): the scan and
    the fused scan, every direction and dtype, against the float64 reference."""
    from gspn_ref.testing import check_fused_case
    from gspn_tvm import compute
    from gspn_tvm.schedules import cpu

    called = []
    pick = kernels._forward_symbol
    monkeypatch.setattr(kernels, "_forward_symbol", lambda *a: called.append(pick(*a)) or called[-1])
    case = ScanCase(*shape, direction, chunk)
    assert cpu.lanes_serve(direction, *shape[1:2], *shape[3:])
    check_scan_case(kernels.scan_forward, case, dtype, backward=False)
    check_fused_case(kernels.fused_scan_forward, case, dtype, backward=False)
    assert called == [compute.lanes_name(compute.forward_name(direction)),
                      compute.lanes_name(compute.fused_forward_name(direction))], called  # fmt: skip


@pytest.mark.parametrize("direction", gspn_ref.DIRECTIONS)
@pytest.mark.parametrize("shape, chunk", [((2, 32, 32, 5, 7), 2), ((1, 16, 16, 1, 9), 0), ((1, 16, 16, 9, 1), 3),
                                          ((2, 16, 16, 12, 12), 5)])  # fmt: skip
@pytest.mark.parametrize("dtype", TVM_DTYPES)
def test_lane_adjoint_on_small_planes(direction, shape, chunk, dtype, monkeypatch):
    """Small planes with one weight group per channel run the lane adjoint: gradients of all five
    inputs against the float64 reference, every direction and dtype (grouped weights keep the
    plane adjoint, which sums a group's channels)."""
    from gspn_tvm import compute

    names = []
    compiled = kernels._compiled
    monkeypatch.setattr(kernels, "_compiled", lambda name, *a: names.append(name) or compiled(name, *a))
    check_scan_case(kernels.scan_forward, ScanCase(*shape, direction, chunk), dtype, backward=kernels.scan_backward)
    assert compute.lanes_name(compute.backward_name(direction)) in names, names
    names.clear()
    grouped = ScanCase(shape[0], shape[1], shape[1] // 2, *shape[3:], direction, chunk)
    check_scan_case(kernels.scan_forward, grouped, dtype, backward=kernels.scan_backward)
    assert compute.backward_name(direction) in names, names


@pytest.mark.parametrize(("direction", "C", "H", "W", "served"), [
    ("l2r", 2304, 14, 14, True), ("t2b", 4608, 7, 7, True), ("l2r", 1152, 28, 28, True), ("t2b", 1152, 28, 28, False),
    ("t2b", 256, 16, 16, False), ("r2l", 24, 7, 7, False), ("b2t", 576, 56, 56, False), ("r2l", 64, 40, 40, True),
    ("l2r", 64, 41, 40, False),
])  # fmt: skip
def test_lane_kernel_choice(direction, C, H, W, served):
    """Lane kernels for channel counts divisible by 16 and planes of at most 1600 elements: every column
    scan, rows shorter than 24 that are not whole vectors (measured faster, see ``lanes_serve``)."""
    from gspn_tvm.schedules import cpu

    assert cpu.lanes_serve(direction, C, H, W) is served


@pytest.mark.parametrize(("C", "served"), [(576, True), (64, True), (24, False), (4608, True)])
def test_projected_lane_kernel_choice(C, served):
    """The projecting lane kernel (Relax, GSPN-T's mixers) takes any channel count divisible by 16, at
    any plane size (it reads one input instead of seven and never writes the projections)."""
    from gspn_tvm.schedules import cpu

    assert cpu.projected_lanes_serve(C) is served


def test_operator_autograd_runs_tvm(tvm_enabled, monkeypatch):
    """gspn_scan and its autograd go through the TVM kernels and agree with the reference."""
    calls = []
    real_library = kernels.library
    monkeypatch.setattr(kernels, "library", lambda device, dtype, kind="scan": calls.append(device) or real_library(device, dtype, kind))
    inputs = [t.requires_grad_() for t in make_scan_inputs(2, 4, 2, 7, 5, torch.float32, seed=3)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    h = gspn_ref.gspn_scan(*inputs, "r2l", 2)
    (h * h).sum().backward()
    h_ref = gspn_ref.gspn_scan_ref(*reference_inputs, "r2l", 2)
    (h_ref * h_ref).sum().backward()
    assert len(calls) == 2, "forward and backward must both run TVM code"
    assert_close_scaled(h, h_ref, torch.float32, 5, "h")
    for name, a, b in zip(("dx", "dlam", "dgl", "dgm", "dgr"), inputs, reference_inputs):
        assert_close_scaled(a.grad, b.grad, torch.float32, 5 * 2, name)


def test_disable_returns_to_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "library", lambda *args: calls.append(args) or pytest.fail("TVM ran while disabled"))
    gspn_tvm.enable()
    gspn_tvm.disable()
    assert not gspn_tvm.is_enabled("cpu")
    x, lam, gl, gm, gr = make_scan_inputs(1, 2, 1, 4, 4, torch.float32)
    gspn_ref.gspn_scan(x, lam, gl, gm, gr, "t2b", 0)
    assert calls == []


def test_non_contiguous_inputs_and_float64_fallback(tvm_enabled):
    x, lam, gl, gm, gr = make_scan_inputs(2, 3, 3, 6, 5, torch.float32, direction="l2r")
    swapped = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, lam, gl, gm, gr)]
    assert not swapped[0].is_contiguous()
    h = gspn_ref.gspn_scan(*swapped, "l2r", 0)
    assert_close_scaled(h, gspn_ref.gspn_scan_ref(x, lam, gl, gm, gr, "l2r", 0), torch.float32, 5, "h")
    doubles = [t.double() for t in (x, lam, gl, gm, gr)]
    h64 = gspn_ref.gspn_scan(*doubles, "t2b", 0)  # float64 has no TVM kernel: the reference runs
    assert h64.dtype == torch.float64
    torch.testing.assert_close(h64, naive_scan_float64(*doubles, "t2b"), rtol=1e-12, atol=1e-12)


def _layers(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = gspn_ref.GSPN(8, **kwargs).eval()
    return layer


@pytest.mark.parametrize("kwargs", [{}, {"chunk": 3}])
def test_gspn_layer_with_tvm_matches_reference(kwargs):
    layer = _layers(**kwargs)
    x = torch.randn(2, 8, 9, 7, generator=torch.Generator().manual_seed(1), requires_grad=True)
    expected = layer(x)
    expected.sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    gspn_tvm.enable()
    try:
        got = layer(x)
        got.sum().backward()
    finally:
        gspn_tvm.disable()
    assert_close_scaled(got, expected, torch.float32, 9 * 4, "layer output")
    assert_close_scaled(x.grad, expected_grad, torch.float32, 9 * 4, "layer input gradient")


def test_gspn_layer_compiles_fullgraph_with_tvm(tvm_enabled):
    layer = _layers()
    x = torch.randn(1, 8, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with gspn_tvm.enabled(False):  # the reference kernels: not the code under test
            expected = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        got = compiled(x)
    assert_close_scaled(got, expected, torch.float32, 6 * 4, "compiled layer")


# The kernel cache (damaged, foreign, unwritable entries, concurrent writers): tests/tvm/test_tvm_cache.py.


# The structure of the column-scan tiles and the workspace they keep: tests/tvm/test_tvm_schedules.py.


THREADS = """
import json, torch
from gspn_tvm import kernels, threads
from helpers import make_scan_inputs
x, lam, gl, gm, gr = make_scan_inputs(1, 2, 1, 8, 8, torch.float32)
seen = []
for count in (3, 1, 2):
    torch.set_num_threads(count)
    kernels.scan_forward(x, lam, gl, gm, gr, "l2r", 0)
    seen.append(threads.running_threads())
print(json.dumps(seen))
"""


def test_kernels_run_on_as_many_threads_as_torch():
    """The TVM pool follows torch.get_num_threads() (TVM alone runs half the hardware threads), up
    and down, in a fresh process (the pool's capacity is fixed when a thread first uses it)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = f"{root}:{root / 'tests'}"
    result = subprocess.run([sys.executable, "-c", THREADS], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [3, 1, 2]


@pytest.mark.parametrize("count, error, match", [(0, ValueError, "count: expected an int >= 1; got 0"),
                                                 (2.0, TypeError, "count: expected an int >= 1; got float")])
def test_thread_count_is_checked(count, error, match):
    from gspn_tvm import threads

    with pytest.raises(error, match=match):
        threads.use_threads(count)
