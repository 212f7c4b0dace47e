"""Whole GSPN models compiled by TVM Relax (``gspn_tvm.relax_frontend``) against torch eager.

Each model is compiled once per module (compiles take seconds); sizes are small. Tolerances follow
``tests.helpers.scan_tolerance`` for float32 with one accumulated term per scanned line and per
reduced channel, relative to the output scale.
"""

from __future__ import annotations

import logging

import pytest
import torch
import tvm

import export
from gspn_ref import GSPN, TinyGSPNClassifier
from gspn_tvm import relax_cpu_schedule
from gspn_tvm.relax_frontend import CompiledModel, compile_model, compile_onnx
from helpers import assert_close_scaled, run_artifact_runtime_only, without_relax_cache


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial parameters everywhere (GRN starts as the identity, alpha as a constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.eval()


def random_input(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def n_terms(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Accumulated terms bounding the rounding error: lines of a scan plus the widest reduction."""
    widest = max(p.shape[1] if p.dim() == 4 else p.numel() for p in model.parameters())
    return x.shape[-2] + x.shape[-1] + widest


def assert_matches_eager(compiled, model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
    actual = compiled(x)
    assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype
    assert_close_scaled(actual, expected, torch.float32, n_terms(model, x), what=f"output at {tuple(x.shape)}")


@pytest.fixture(scope="module")
def layer():
    """A GSPN layer with weight groups and local (chunked) propagation."""
    return randomize_(GSPN(8, d_inner=16, d_proxy=4, chunk=3, groups=4), seed=1)


#: Fusion fallbacks (``relax_cpu_schedule.fusion_fallbacks``) logged while compiling each shipped model.
FALLBACKS: dict[str, list[str]] = {}


def compile_recording_fallbacks(name: str, model: torch.nn.Module, example: torch.Tensor) -> CompiledModel:
    """Compiled without the Relax cache (``tests/conftest.py`` sets one): a cache hit would record nothing."""
    before = len(relax_cpu_schedule.fusion_fallbacks)
    with without_relax_cache():
        compiled = compile_model(model, (example,))
    FALLBACKS[name] = relax_cpu_schedule.fusion_fallbacks[before:]
    return compiled


@pytest.fixture(scope="module")
def compiled_layer(layer) -> CompiledModel:
    return compile_recording_fallbacks("GSPN layer", layer, random_input((2, 8, 12, 10), seed=2))


@pytest.fixture(scope="module")
def classifier():
    return randomize_(TinyGSPNClassifier(dims=(8, 16), depths=(1, 1), d_proxy=4), seed=3)


@pytest.fixture(scope="module")
def compiled_classifier(classifier) -> CompiledModel:
    return compile_recording_fallbacks("TinyGSPNClassifier", classifier, random_input((2, 3, 32, 32), seed=4))


def test_shipped_models_compile_with_operator_fusion(compiled_layer, compiled_classifier):
    """The unfused fallback of ``fuse_operators`` is for other models: the shipped ones never take it."""
    assert FALLBACKS == {"GSPN layer": [], "TinyGSPNClassifier": []}


def test_fusion_fallback_is_logged_with_its_reason(monkeypatch, caplog):
    def failing_fuse_tir():
        def fail(mod):
            raise tvm.error.InternalError("Check failed: key is not in Map")

        return fail

    monkeypatch.setattr(relax_cpu_schedule, "FuseTIR", failing_fuse_tir)
    before = len(relax_cpu_schedule.fusion_fallbacks)
    mod = tvm.IRModule()
    with caplog.at_level(logging.WARNING, logger="gspn_tvm.relax_cpu_schedule"):
        result = relax_cpu_schedule.fuse_operators(mod)
    assert result.same_as(mod) or tvm.ir.structural_equal(result, mod)
    assert relax_cpu_schedule.fusion_fallbacks[before:] == ["InternalError: Check failed: key is not in Map"]
    attempts = relax_cpu_schedule.FUSION_ATTEMPTS
    assert f"operator fusion failed {attempts} times (InternalError: Check failed: key is not in Map); the model runs unfused" in caplog.text


@pytest.mark.parametrize("shape", [(2, 8, 12, 10), (1, 8, 5, 7), (3, 8, 1, 9), (2, 8, 16, 1), (1, 8, 17, 23)])
def test_layer_matches_eager_at_any_size(compiled_layer, layer, shape):
    assert_matches_eager(compiled_layer, layer, random_input(shape, seed=sum(shape)))


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 16, 24), (3, 3, 40, 56)])
def test_classifier_matches_eager_at_any_size(compiled_classifier, classifier, shape):
    assert_matches_eager(compiled_classifier, classifier, random_input(shape, seed=sum(shape)))


def test_signature_names_dynamic_and_fixed_dimensions(compiled_layer):
    (spec,) = compiled_layer.signature["inputs"]
    assert spec["shape"] == ["batch", 8, "height", "width"] and spec["dtype"] == "float32"
    assert "(batch, 8, height, width)" in repr(compiled_layer)


def test_dynamic_model_rejects_wrong_channels_rank_and_dtype(compiled_layer):
    compiled = r"compiled for shape \(batch, 8, height, width\) float32"
    with pytest.raises(ValueError, match=compiled + r"; got \(2, 9, 6, 6\) float32 \(dimension 1 is fixed at 8\)"):
        compiled_layer(torch.zeros(2, 9, 6, 6))
    with pytest.raises(ValueError, match=compiled + r"; got \(8, 6, 6\) float32 \(rank 3 instead of 4\)"):
        compiled_layer(torch.zeros(8, 6, 6))
    with pytest.raises(ValueError, match=compiled + r"; got \(2, 8, 6, 6\) float64 \(dtype differs\)"):
        compiled_layer(torch.zeros(2, 8, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected 1 input\(s\) \(x\); got 2"):
        compiled_layer(torch.zeros(2, 8, 6, 6), torch.zeros(2, 8, 6, 6))


def test_classifier_keeps_the_minimum_size_torch_export_derived(compiled_classifier, classifier):
    """The strided stem and downsampling give height and width a minimum above torch's floor of 2;
    one below it is refused naming the bound, the bound itself runs and matches eager."""
    bounds = compiled_classifier.signature["lower_bounds"]
    assert set(bounds) == {"height", "width"}, bounds
    assert all(bound > 2 for bound in bounds.values()), bounds
    height, width = bounds["height"], bounds["width"]
    message = r"compiled for shape \(batch, 3, height, width\) float32; got \(1, 3, {}, {}\) float32 \(dimension {}, {}, must be >= {}\)"
    with pytest.raises(ValueError, match=message.format(height - 1, width, 2, "height", height)):
        compiled_classifier(torch.zeros(1, 3, height - 1, width))
    with pytest.raises(ValueError, match=message.format(height, width - 1, 3, "width", width)):
        compiled_classifier(torch.zeros(1, 3, height, width - 1))
    assert_matches_eager(compiled_classifier, classifier, random_input((1, 3, height, width), seed=16))


def test_static_compile_names_the_compiled_shape():
    layer = randomize_(GSPN(4, d_proxy=2, directions=("t2b", "r2l")), seed=5)
    x = random_input((2, 4, 6, 5), seed=6)
    compiled = compile_model(layer, (x,), dynamic=False)
    assert_matches_eager(compiled, layer, x)
    message = r"x: the model was compiled for shape \(2, 4, 6, 5\) float32; got \(2, 4, 7, 5\) float32 \(dimension 2 is fixed at 6\)"
    with pytest.raises(ValueError, match=message):
        compiled(torch.zeros(2, 4, 7, 5))


def test_outputs_are_not_overwritten_by_the_next_call(compiled_layer, layer):
    x1, x2 = random_input((2, 8, 6, 6), seed=7), random_input((2, 8, 6, 6), seed=8)
    first = compiled_layer(x1)
    kept = first.clone()
    compiled_layer(x2)
    assert torch.equal(first, kept)


def test_non_contiguous_input_is_accepted(compiled_layer, layer):
    x = random_input((2, 8, 9, 7), seed=9).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    assert_matches_eager(compiled_layer, layer, x)


def test_onnx_custom_op_model_matches_eager(layer, tmp_path):
    path = tmp_path / "layer_custom.onnx"
    export.to_onnx(layer, (random_input((2, 8, 12, 10), seed=10),), path, mode="custom")
    compiled = compile_onnx(path)
    assert compiled.signature["inputs"][0]["shape"] == ["batch", 8, "height", "width"]
    for shape in [(2, 8, 12, 10), (1, 8, 7, 13), (3, 8, 5, 4)]:
        assert_matches_eager(compiled, layer, random_input(shape, seed=11 + sum(shape)))
    fixed = compile_onnx(path, input_shapes={"x": ("batch", 8, 6, 5)})
    assert_matches_eager(fixed, layer, random_input((2, 8, 6, 5), seed=12))
    with pytest.raises(ValueError, match=r"compiled for shape \(batch, 8, 6, 5\) float32; got \(2, 8, 6, 6\)"):
        fixed(torch.zeros(2, 8, 6, 6))


def test_onnx_portable_unrolled_model_imports_as_it_is(tmp_path):
    layer = randomize_(GSPN(4, d_proxy=2, chunk=2), seed=12)
    x = random_input((1, 4, 5, 6), seed=13)
    path = tmp_path / "layer_portable.onnx"
    proto = export.to_onnx(layer, (x,), path, mode="portable-unrolled", dynamic=False)
    assert not any(node.domain == "gspn" for node in proto.graph.node)
    assert_matches_eager(compile_onnx(path), layer, x)


def test_onnx_portable_scan_loop_is_refused_with_the_way_out(tmp_path):
    layer = randomize_(GSPN(4, d_proxy=2, directions=("l2r",)), seed=14)
    path = tmp_path / "layer_loop.onnx"
    export.to_onnx(layer, (random_input((2, 4, 4, 4), seed=15),), path, mode="portable")
    with pytest.raises(ValueError, match="does not implement.*mode='custom'.*mode='portable-unrolled'"):
        compile_onnx(path)


def test_saved_artifact_runs_with_the_tvm_runtime_alone(compiled_classifier, classifier, tmp_path):
    artifact = compiled_classifier.save(tmp_path / "tiny")
    assert {p.name for p in artifact.iterdir()} == {"model.so", "params.bin", "signature.json"}
    inputs = [random_input(shape, seed=sum(shape)) for shape in [(2, 3, 32, 32), (1, 3, 24, 40)]]
    outputs, stdout = run_artifact_runtime_only(artifact, [x.numpy() for x in inputs], tmp_path)
    assert "rejected: x: the model was compiled for shape (batch, 3, height, width) float32" in stdout
    for x, output in zip(inputs, outputs):
        with torch.no_grad():
            expected = classifier(x)
        actual = torch.from_numpy(output)
        assert_close_scaled(actual, expected, torch.float32, n_terms(classifier, x), what=f"runtime-only {tuple(x.shape)}")


def test_fusion_failure_is_retried_on_a_copy_with_fresh_variables(monkeypatch):
    """TVM 0.27's FuseTIR fails depending on variable addresses: a retry on fresh variables may succeed."""
    real_fuse_tir = relax_cpu_schedule.FuseTIR
    calls = []

    def flaky_fuse_tir():
        def run(mod):
            calls.append(mod)
            if len(calls) <= 2:
                raise KeyError("key is not in Map")
            return real_fuse_tir()(mod)

        return run

    monkeypatch.setattr(relax_cpu_schedule, "FuseTIR", flaky_fuse_tir)
    before = len(relax_cpu_schedule.fusion_fallbacks)
    relax_cpu_schedule.fuse_operators(tvm.IRModule())
    assert len(calls) == 3 and relax_cpu_schedule.fusion_fallbacks[before:] == []
