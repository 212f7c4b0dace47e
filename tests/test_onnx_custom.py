"""The native ONNX Runtime operator gspn::GSPNScan against the reference (SPEC section 5.9)."""

from __future__ import annotations

import functools
import threading

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import export
import gspn_ref
from helpers import assert_close_scaled, make_scan_inputs, scan_cases

DTYPES = (torch.float32, torch.float16)


@functools.lru_cache(maxsize=None)
def custom_session(direction: str, chunk: int, dtype: torch.dtype):
    return export.session(export.scan_model(direction, chunk, dtype), intra_op_num_threads=2)


def run_custom(inputs, direction, chunk):
    session = custom_session(direction, chunk, inputs[0].dtype)
    return torch.from_numpy(session.run(None, export.scan_feeds(*inputs))[0])


@given(case=scan_cases(max_side=11, max_batch=2), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 3))
def test_custom_op_matches_reference(case, dtype, seed):
    inputs = make_scan_inputs(case.B, case.C, case.G, case.H, case.W, dtype, seed=seed, direction=case.direction)
    expected = gspn_ref.gspn_scan_ref(*inputs, direction=case.direction, chunk=case.chunk)
    actual = run_custom(inputs, case.direction, case.chunk)
    assert actual.dtype == dtype
    assert_close_scaled(actual, expected, dtype, case.n_lines, f"ORT custom op {case}")


@pytest.mark.parametrize("direction", gspn_ref.DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_op_long_lines_and_strips(direction, dtype):
    # Lines longer than a vector, W not a multiple of the 16-column strips of the column scans,
    # unnormalized (contracting) weights, groups and a chunk that does not divide the lines.
    B, C, G, H, W, chunk = 2, 6, 3, 37, 70, 9
    inputs = make_scan_inputs(B, C, G, H, W, dtype, seed=5, normalized=False, direction=direction)
    expected = gspn_ref.gspn_scan_ref(*inputs, direction=direction, chunk=chunk)
    actual = run_custom(inputs, direction, chunk)
    n_lines = gspn_ref.line_count(direction, H, W)
    assert_close_scaled(actual, expected, dtype, n_lines, f"{direction} {dtype}")


@pytest.mark.parametrize("direction", gspn_ref.DIRECTIONS)
@pytest.mark.parametrize("chunk", [0, 3])
def test_custom_op_constant_propagation(direction, chunk):
    # SPEC 5.1: normalized weights, lam = x = 1 give h_s = (s mod chunk) + 1 on line s.
    x, _, gl, gm, gr = make_scan_inputs(1, 2, 1, 7, 9, torch.float32, direction=direction)
    ones = torch.ones_like(x)
    h = run_custom((ones, ones, gl, gm, gr), direction, chunk)
    n_lines = gspn_ref.line_count(direction, 7, 9)
    s = torch.arange(n_lines, dtype=torch.float32)
    if gspn_ref.is_reversed(direction):
        s = s.flip(0)
    expected_line = (s % chunk if chunk else s) + 1
    expected = expected_line.view(1, 1, -1, 1) if not gspn_ref.is_column(direction) else expected_line.view(1, 1, 1, -1)
    torch.testing.assert_close(h, expected.expand_as(h), rtol=1e-5, atol=1e-5)


def test_scan_model_declares_the_operator():
    model = export.scan_model("l2r", 2, torch.float16)
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("gspn", "GSPNScan")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"direction": b"l2r", "chunk": 2}
    assert {(o.domain, o.version) for o in model.opset_import} >= {("gspn", 1)}


def test_one_session_from_eight_threads_is_deterministic():
    direction, chunk = "r2l", 0
    inputs = make_scan_inputs(2, 8, 4, 33, 41, torch.float32, seed=3, direction=direction)
    session = export.session(export.scan_model(direction, chunk), intra_op_num_threads=2)
    feeds = export.scan_feeds(*inputs)
    expected = session.run(None, feeds)[0]
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker():
        try:
            for _ in range(10):
                out = session.run(None, feeds)[0]
                with lock:
                    results.append(out)
        except BaseException as error:  # reported below
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 80
    for out in results:
        np.testing.assert_array_equal(out, expected)
    reference = gspn_ref.gspn_scan_ref(*inputs, direction=direction, chunk=chunk)
    assert_close_scaled(torch.from_numpy(expected), reference, torch.float32, 41, "threaded")
