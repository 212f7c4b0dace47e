"""The portable (standard-operator) form of GSPNScan: its structure, and the unrolled variant in ONNX
Runtime and TVM's ONNX importer. (The Scan-based form is checked against the reference in ONNX
Runtime and onnx.reference by the backend suite, tests/backends.)"""

from __future__ import annotations

import functools

import onnx
import onnxruntime as ort
import pytest
import torch

import export
import gspn_ref
from helpers import assert_close_scaled, make_scan_inputs

DTYPES = (torch.float32, torch.float16)


@functools.lru_cache(maxsize=None)
def portable_model(direction: str, chunk: int, dtype: torch.dtype) -> onnx.ModelProto:
    return export.scan_model(direction, chunk, dtype, mode="portable")


@functools.lru_cache(maxsize=None)
def portable_session(direction: str, chunk: int, dtype: torch.dtype):
    # Stock ONNX Runtime: no custom-op library registered.
    return ort.InferenceSession(portable_model(direction, chunk, dtype).SerializeToString(),
                                providers=["CPUExecutionProvider"])  # fmt: skip


def test_portable_model_uses_standard_operators_only():
    model = portable_model("b2t", 2, torch.float16)
    onnx.checker.check_model(model, full_check=True)
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}
    assert all(o.domain in ("", "ai.onnx") for o in model.opset_import)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert any(node.op_type == "Scan" for node in model.graph.node)


@pytest.mark.parametrize("direction, chunk", [("t2b", 0), ("l2r", 2), ("b2t", 3), ("r2l", 0)])
def test_unrolled_portable_form_matches_reference(direction, chunk):
    B, C, G, H, W = 1, 4, 2, 5, 6
    model = export.scan_model(direction, chunk, mode="portable-unrolled", shape=(B, C, G, H, W))
    onnx.checker.check_model(model, full_check=True)
    assert not any(node.op_type in ("Scan", "Loop", "If") for node in model.graph.node)
    inputs = make_scan_inputs(B, C, G, H, W, torch.float32, seed=4, direction=direction)
    expected = gspn_ref.gspn_scan_ref(*inputs, direction=direction, chunk=chunk)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, export.scan_feeds(*inputs))[0]
    n_lines = gspn_ref.line_count(direction, H, W)
    assert_close_scaled(torch.from_numpy(out), expected, torch.float32, n_lines, "unrolled in ORT")


@pytest.mark.parametrize("direction, chunk", [("t2b", 0), ("r2l", 2)])
def test_unrolled_portable_form_in_tvm_onnx_importer(direction, chunk):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    B, C, G, H, W = 1, 4, 2, 5, 6
    model = export.scan_model(direction, chunk, mode="portable-unrolled", shape=(B, C, G, H, W))
    executable = tvm.compile(from_onnx(model), target="llvm")
    machine = relax.VirtualMachine(executable, tvm.cpu())
    inputs = make_scan_inputs(B, C, G, H, W, torch.float32, seed=6, direction=direction)
    out = machine["main"](*(tvm.runtime.tensor(a) for a in export.scan_feeds(*inputs).values()))
    expected = gspn_ref.gspn_scan_ref(*inputs, direction=direction, chunk=chunk)
    n_lines = gspn_ref.line_count(direction, H, W)
    assert_close_scaled(torch.from_numpy(out.numpy()), expected, torch.float32, n_lines, "unrolled in TVM")


def test_unrolled_needs_a_static_line_count():
    with pytest.raises(ValueError, match="static number of lines"):
        export.scan_model("t2b", mode="portable-unrolled")
