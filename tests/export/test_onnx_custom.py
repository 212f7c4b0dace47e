"""The ONNX model of one custom-op scan: its node, attributes and opset imports. (The operator's
results are checked by the backend suite, tests/backends; its threads and memory by
tests/test_ort_resources.py; its errors by tests/test_onnx_errors.py and tests/test_fuzz_onnx.py.)"""

from __future__ import annotations

import onnx
import torch

import export


def test_scan_model_declares_the_operator():
    model = export.scan_model("l2r", 2, torch.float16)
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("gspn", "GSPNScan")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"direction": b"l2r", "chunk": 2}
    assert {(o.domain, o.version) for o in model.opset_import} >= {("gspn", 1)}
