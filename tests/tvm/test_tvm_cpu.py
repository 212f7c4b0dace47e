"""TVM CPU kernels of gspn::scan against the reference (SPEC section 5, property 9).

Inputs, tolerances and shapes come from ``tests/helpers.py``; every comparison prints its largest
difference. The first run compiles one library per dtype (a few seconds each) into the kernel cache.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gspn_ref
import gspn_tvm
from gspn_tvm import kernels
from helpers import assert_close_scaled, make_scan_inputs, scan_cases

TVM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = ("dx", "dlam", "dgl", "dgm", "dgr")


@pytest.fixture
def tvm_enabled():
    gspn_tvm.enable()
    yield
    gspn_tvm.disable()


def _check_case(case, dtype, seed=0):
    x, lam, gl, gm, gr = make_scan_inputs(case.B, case.C, case.G, case.H, case.W, dtype, seed=seed, direction=case.direction)
    h = kernels.scan_forward(x, lam, gl, gm, gr, case.direction, case.chunk)
    expected = gspn_ref.gspn_scan_ref(x, lam, gl, gm, gr, case.direction, case.chunk)
    assert h.dtype == dtype
    assert_close_scaled(h, expected, dtype, case.n_lines, "h")

    gh = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = kernels.scan_backward(gh, x, lam, gl, gm, gr, expected, case.direction, case.chunk)
    expected_grads = gspn_ref.gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, expected, case.direction, case.chunk)
    group = case.C // case.G
    for name, got, want in zip(NAMES, grads, expected_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close_scaled(got, want, dtype, case.n_lines * (group if name.startswith("dg") else 1), name)


@given(case=scan_cases(), dtype=st.sampled_from(TVM_DTYPES), seed=st.integers(0, 2**16))
def test_tvm_cpu_matches_reference(case, dtype, seed):
    _check_case(case, dtype, seed)


@pytest.mark.parametrize("direction", gspn_ref.DIRECTIONS)
@pytest.mark.parametrize(
    "shape, chunk",
    [((1, 1, 1, 1, 1), 0), ((2, 3, 3, 1, 9), 0), ((1, 2, 1, 9, 1), 2), ((2, 6, 2, 37, 35), 4), ((1, 4, 4, 70, 33), 33)],
)
def test_tvm_cpu_edge_shapes(direction, shape, chunk):
    """H = 1, W = 1, odd sizes, lines longer than a staged tile, chunk not dividing the line count."""
    from helpers import ScanCase

    _check_case(ScanCase(*shape, direction, chunk), torch.float32)


def test_operator_autograd_runs_tvm(tvm_enabled, monkeypatch):
    """gspn_scan and its autograd go through the TVM kernels and agree with the reference."""
    calls = []
    real_library = kernels.library
    monkeypatch.setattr(kernels, "library", lambda device, dtype: calls.append(device) or real_library(device, dtype))
    inputs = [t.requires_grad_() for t in make_scan_inputs(2, 4, 2, 7, 5, torch.float32, seed=3)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    h = gspn_ref.gspn_scan(*inputs, "r2l", 2)
    (h * h).sum().backward()
    h_ref = gspn_ref.gspn_scan_ref(*reference_inputs, "r2l", 2)
    (h_ref * h_ref).sum().backward()
    assert len(calls) == 2, "forward and backward must both run TVM code"
    assert_close_scaled(h, h_ref, torch.float32, 5, "h")
    for name, a, b in zip(NAMES, inputs, reference_inputs):
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
    h64 = gspn_ref.gspn_scan(*doubles, "t2b", 0)
    assert h64.dtype == torch.float64
    torch.testing.assert_close(h64, gspn_ref.gspn_scan_ref(*doubles, "t2b", 0))


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
        expected = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        got = compiled(x)
    assert_close_scaled(got, expected, torch.float32, 6 * 4, "compiled layer")


# The kernel cache (damaged, foreign, unwritable entries, concurrent writers): tests/test_tvm_cache.py.


# The structure of the column-scan tiles and the workspace they keep: tests/test_tvm_schedules.py.


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
