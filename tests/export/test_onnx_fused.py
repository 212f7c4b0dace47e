"""ONNX export of the fused scan: the ``gspn::GSPNFusedScan`` node a torch model exports to, its
schema (checker, shape inference), its portable forms' structure and precision contract, dynamic
sizes, and errors. (Its results on drawn inputs, for every backend, are checked by
tests/backends/test_fused_conformance.py.)"""

from __future__ import annotations

import copy
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import export
import gspn_ref
from gspn_ref import gspn_fused_scan
from gspn_ref.testing import ScanCase, assert_close_scaled, fused_inputs

C, G = 4, 2


class TwoFusedScans(torch.nn.Module):
    """Two fused scans (l2r with chunk 2, b2t) of the same inputs, summed."""

    def forward(self, u, lam, al, am, ar, gate, skip):
        return (gspn_fused_scan(u, lam, al, am, ar, gate, skip, "l2r", 2)
                + gspn_fused_scan(u, lam, al, am, ar, gate, skip, "b2t", 0))  # fmt: skip


def inputs_at(B, H, W, seed=0, dtype=torch.float32):
    return fused_inputs(ScanCase(B, C, G, H, W, "t2b", 0), dtype, seed=seed)


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if (n.domain, n.op_type) == ("gspn", "GSPNFusedScan")]


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The custom and portable exports of TwoFusedScans (dynamic batch, height and width)."""
    folder = tmp_path_factory.mktemp("onnx")
    example = inputs_at(2, 5, 6)
    module = TwoFusedScans().eval()
    custom = export.to_onnx(module, example, folder / "custom.onnx")
    portable = export.to_onnx(module, example, folder / "portable.onnx", mode="portable")
    return folder, custom, portable


def test_one_node_per_fused_scan(exported):
    folder, custom, _ = exported
    onnx.checker.check_model(onnx.load(folder / "custom.onnx"), full_check=True)
    nodes = fused_nodes(custom)
    assert sorted((attributes(n)["direction"], attributes(n)["chunk"]) for n in nodes) == [(b"b2t", 0), (b"l2r", 2)]
    assert [len(n.input) for n in nodes] == [7, 7]
    assert not any(n.op_type == "GSPNScan" for n in custom.graph.node)
    # Nothing of the fused computation is left outside the nodes: no sigmoid, no division.
    assert not {"Sigmoid", "Div", "Max"} & {n.op_type for n in custom.graph.node}
    assert {(o.domain, o.version) for o in custom.opset_import} >= {("gspn", 1)}


def test_dynamic_sizes_and_inferred_output_shapes(exported):
    _, custom, _ = exported
    for value, channels in zip(custom.graph.input, (C, C, G, G, G, C, C)):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[1] == channels and all(isinstance(d, str) for d in (dims[0], *dims[2:])), dims
    outputs = {n.output[0] for n in fused_nodes(custom)}
    shaped = {v.name: v.type.tensor_type for v in custom.graph.value_info if v.name in outputs}
    assert set(shaped) == outputs
    first_input = custom.graph.input[0].type.tensor_type
    for tensor_type in shaped.values():
        assert tensor_type.elem_type == TensorProto.FLOAT
        assert tensor_type.shape == first_input.shape


def run_export(folder, mode: str, feeds):
    if mode == "custom":
        return export.session(folder / "custom.onnx").run(None, feeds)[0]
    stock = ort.InferenceSession(str(folder / "portable.onnx"), providers=["CPUExecutionProvider"])
    return stock.run(None, feeds)[0]


@pytest.mark.parametrize("mode", ["custom", "portable"])
@pytest.mark.parametrize("shape", [(2, 5, 6), (1, 9, 1), (3, 1, 7), (1, 13, 10)], ids=str)
def test_export_runs_at_other_sizes(exported, mode, shape):
    """Both exports at the example size, one-pixel rows and columns, and sizes never traced."""
    folder, _, portable = exported
    assert not fused_nodes(portable)
    inputs = inputs_at(*shape, seed=sum(shape))
    with torch.no_grad():
        expected = TwoFusedScans()(*(t.double() for t in inputs))
    out = run_export(folder, mode, export.fused_scan_feeds(*inputs))
    n_lines = max(shape[1], shape[2])
    assert_close_scaled(torch.from_numpy(out), expected, torch.float32, n_lines, f"{mode} export at {shape}")


def test_schema_infers_type_and_shape_of_y():
    model = export.fused_scan_model("r2l", 3, "float16", shape=(2, 6, 3, 5, 7))
    node = model.graph.node[0]
    # y feeds an Identity, so that its type comes from the schema's inference alone.
    model.graph.node.append(helper.make_node("Identity", [node.output[0]], ["out"]))
    model.graph.ClearField("output")
    model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT16, None))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (y,) = [v for v in inferred.graph.value_info if v.name == node.output[0]]
    assert y.type.tensor_type.elem_type == TensorProto.FLOAT16
    assert [d.dim_value for d in y.type.tensor_type.shape.dim] == [2, 6, 5, 7]


def test_fused_scan_model_declares_the_operator():
    model = export.fused_scan_model("l2r", 2, torch.float16)
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("gspn", "GSPNFusedScan")
    assert tuple(node.input) == gspn_ref.onnx_op.FUSED_INPUT_NAMES
    assert attributes(node) == {"direction": b"l2r", "chunk": 2}
    weights = [v for v in model.graph.input if v.name in ("al", "am", "ar")]
    assert [d.dim_param for d in weights[0].type.tensor_type.shape.dim] == ["B", "G", "H", "W"]


@functools.lru_cache(maxsize=None)
def portable_model(direction, chunk, dtype, unroll_shape=None):
    if unroll_shape is None:
        return export.fused_scan_model(direction, chunk, dtype, mode="portable")
    return export.fused_scan_model(direction, chunk, dtype, mode="portable-unrolled", shape=unroll_shape)


def test_portable_form_standard_operators_float32_inside():
    """float16 model: standard operators only, Scan over lines, sigmoid from Exp, and every
    intermediate in float32: y is cast to float16 once, at the end."""
    model = portable_model("b2t", 2, "float16")
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert all(o.domain in ("", "ai.onnx") for o in model.opset_import)
    ops = [n.op_type for n in model.graph.node]
    assert "Scan" in ops and "Exp" in ops and "Sigmoid" not in ops
    to_half = [n for n in model.graph.node if n.op_type == "Cast" and attributes(n)["to"] == TensorProto.FLOAT16]
    assert [n.output[0] for n in to_half] == ["y"]
    to_float = [n for n in model.graph.node if n.op_type == "Cast" and attributes(n)["to"] == TensorProto.FLOAT]
    assert sorted(n.input[0] for n in to_float) == sorted(gspn_ref.onnx_op.FUSED_INPUT_NAMES)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    computed = [n.output[0] for n in model.graph.node if n.op_type in ("Exp", "Reciprocal", "Div", "Max", "Mul", "Add")]
    assert computed and {types[name] for name in computed} == {TensorProto.FLOAT}
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


@pytest.mark.parametrize("direction, chunk", [("t2b", 0), ("l2r", 2), ("b2t", 3), ("r2l", 0)])
def test_unrolled_portable_form_matches_reference(direction, chunk):
    B, H, W = 1, 5, 6
    model = portable_model(direction, chunk, "float32", (B, C, G, H, W))
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type in ("Scan", "Loop", "If") for n in model.graph.node)
    inputs = inputs_at(B, H, W, seed=4)
    expected = gspn_ref.gspn_fused_scan_ref(*(t.double() for t in inputs), direction, chunk)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, export.fused_scan_feeds(*inputs))[0]
    n_lines = gspn_ref.line_count(direction, H, W)
    assert_close_scaled(torch.from_numpy(out), expected, torch.float32, n_lines, "unrolled in ORT")


def test_feeds_names_and_layout():
    inputs = inputs_at(1, 3, 4)
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in inputs]
    feeds = export.fused_scan_feeds(*strided)
    assert tuple(feeds) == gspn_ref.onnx_op.FUSED_INPUT_NAMES
    for array, t in zip(feeds.values(), inputs):
        assert array.flags.c_contiguous and np.array_equal(array, t.numpy())


# ---- errors ----


def test_unrolled_needs_a_static_line_count():
    with pytest.raises(ValueError, match="static number of lines"):
        export.fused_scan_model("l2r", mode="portable-unrolled")
    with pytest.raises(ValueError, match="static number of lines"):
        export.fused_scan_model("t2b", mode="portable-unrolled", shape=(1, C, G, "H", 4))


def test_fused_scan_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode: expected one of .*'fast'"):
        export.fused_scan_model("t2b", mode="fast")
    with pytest.raises(ValueError, match="dtype: expected float32 or float16; got 'int32'"):
        export.fused_scan_model("t2b", dtype="int32")


def without_attribute(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    model = copy.deepcopy(model)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    node.ClearField("attribute")
    node.attribute.extend(kept)
    return model


def test_checker_enforces_the_schema():
    model = export.fused_scan_model("t2b")
    with pytest.raises(onnx.checker.ValidationError, match="Required attribute 'direction' is missing"):
        onnx.checker.check_model(without_attribute(model, "direction"), full_check=True)
    six_inputs = copy.deepcopy(model)
    six_inputs.graph.node[0].input.pop()
    with pytest.raises(onnx.checker.ValidationError, match="input size 6 not in range"):
        onnx.checker.check_model(six_inputs, full_check=True)
    mixed = copy.deepcopy(model)
    mixed.graph.input[5].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(onnx.shape_inference.InferenceError, match="gate has inconsistent type"):
        onnx.checker.check_model(mixed, full_check=True)


def test_make_portable_rejects_bad_nodes():
    model = export.fused_scan_model("t2b")
    bad_direction = copy.deepcopy(model)
    (direction,) = [a for a in bad_direction.graph.node[0].attribute if a.name == "direction"]
    direction.s = b"diagonal"
    with pytest.raises(ValueError, match="fused_scan: attribute direction: expected one of .* got 'diagonal'"):
        export.make_portable(bad_direction)
    with pytest.raises(ValueError, match="fused_scan: attribute direction"):
        export.make_portable(without_attribute(model, "direction"))
    six_inputs = copy.deepcopy(model)
    six_inputs.graph.node[0].input.pop()
    with pytest.raises(ValueError, match="expected 7 inputs and 1 output; got 6 and 1"):
        export.make_portable(six_inputs)
    doubles = copy.deepcopy(model)
    for value in (*doubles.graph.input, *doubles.graph.output):
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(ValueError, match="must be float32 or float16; got DOUBLE"):
        export.make_portable(doubles)


def test_to_onnx_rejects_invalid_fused_calls(tmp_path):
    """The operator's own ValueError / TypeError, not torch.export's wrapper around it."""
    u, lam, al, am, ar, gate, skip = inputs_at(2, 5, 6)
    with pytest.raises(ValueError, match="gate: expected shape"):
        export.to_onnx(TwoFusedScans(), (u, lam, al, am, ar, gate[:, :, :4], skip), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="skip: expected dtype torch.float32"):
        export.to_onnx(TwoFusedScans(), (u, lam, al, am, ar, gate, skip.double()), tmp_path / "m.onnx")
