"""The GSPN layer and the tiny classifier exported both ways and run at several sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
import gspn_ref


SCAN_OPS = ("GSPNScan", "GSPNFusedScan")


def count_scans(model: onnx.ModelProto) -> int:
    return sum(node.domain == "gspn" and node.op_type in SCAN_OPS for node in model.graph.node)


def scans_in(module: torch.nn.Module) -> int:
    """One scan per direction of every GSPN layer of ``module``."""
    return sum(len(m.directions) for m in module.modules() if isinstance(m, gspn_ref.GSPN))


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    # Compact groups and GSPN-local chunks, so both attributes travel through the export.
    return gspn_ref.GSPN(8, d_proxy=4, chunk=3, groups=4).eval()


@pytest.fixture(scope="module")
def layer_models(layer, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "gspn_layer.onnx"
    custom = export.to_onnx(layer, (torch.randn(2, 8, 16, 16),), path)
    return path, custom, export.make_portable(custom)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    return gspn_ref.TinyGSPNClassifier().eval()


@pytest.fixture(scope="module")
def classifier_models(classifier, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    example = (torch.randn(2, 3, 32, 32),)
    custom = export.to_onnx(classifier, example, folder / "custom.onnx")
    portable = export.to_onnx(classifier, example, folder / "portable.onnx", mode="portable")
    return folder, custom, portable


def test_layer_exports_one_custom_node_per_scan(layer, layer_models):
    path, custom, portable = layer_models
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert count_scans(custom) == scans_in(layer) == len(gspn_ref.DIRECTIONS)
    assert {n.op_type for n in custom.graph.node if n.domain == "gspn"} == {"GSPNFusedScan"}  # the layer's default
    directions = sorted(onnx.helper.get_attribute_value(a).decode() for n in custom.graph.node
                        if n.op_type in SCAN_OPS for a in n.attribute if a.name == "direction")  # fmt: skip
    assert directions == sorted(gspn_ref.DIRECTIONS)
    chunks = {onnx.helper.get_attribute_value(a) for n in custom.graph.node
              if n.op_type in SCAN_OPS for a in n.attribute if a.name == "chunk"}  # fmt: skip
    assert chunks == {layer.chunk}
    assert count_scans(portable) == 0
    onnx.checker.check_model(portable, full_check=True)
    # Dynamic batch and spatial sizes, static channels, and shapes carried on the scan outputs.
    dims = custom.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 8, "height", "width"]
    scan_outputs = {n.output[0] for n in custom.graph.node if n.op_type in SCAN_OPS}
    shaped = [v for v in custom.graph.value_info if v.name in scan_outputs]
    assert len(shaped) == scans_in(layer) and all(len(v.type.tensor_type.shape.dim) == 4 for v in shaped)


@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (1, 8, 17, 45), (3, 8, 1, 5), (1, 8, 9, 1)])
def test_layer_runs_at_other_sizes_both_ways(layer, layer_models, shape):
    path, _, portable = layer_models
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        expected = layer(x).numpy()
    custom_out = export.session(path).run(None, {"x": x.numpy()})[0]
    stock = ort.InferenceSession(portable.SerializeToString(), providers=["CPUExecutionProvider"])
    portable_out = stock.run(None, {"x": x.numpy()})[0]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(custom_out, expected, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(portable_out, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 24, 40), (3, 3, 8, 16)])
def test_classifier_runs_at_other_sizes_both_ways(classifier, classifier_models, shape):
    folder, custom, portable = classifier_models
    assert count_scans(custom) == scans_in(classifier) and count_scans(portable) == 0
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        expected = classifier(x).numpy()
    custom_out = export.session(folder / "custom.onnx").run(None, {"x": x.numpy()})[0]
    stock = ort.InferenceSession(str(folder / "portable.onnx"), providers=["CPUExecutionProvider"])
    portable_out = stock.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(custom_out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(portable_out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(custom_out.argmax(1), expected.argmax(1))


def test_to_onnx_rejects_bad_arguments(layer, tmp_path):
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        export.to_onnx(layer, (x,), tmp_path / "m.onnx", mode="fast")
    with pytest.raises(ValueError, match="dynamic=False"):
        export.to_onnx(layer, (x,), tmp_path / "m.onnx", mode="portable-unrolled")
    with pytest.raises(ValueError, match="opset"):
        export.to_onnx(layer, (x,), tmp_path / "m.onnx", opset=13)
