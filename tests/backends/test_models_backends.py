"""The paper's network on every backend, against the eager reference, on the original code's tiny16 case.

The network is the original's tiny configuration with ``EMBED_DIM 16`` and 10 classes, its state dict
loaded strictly from ``gspn_ref/data/official_gspn_tiny16.npz`` (see ``tests/test_models.py``). Backends:
the TVM kernels in torch eager (forward and backward), ONNX Runtime with the custom operator (at the
export size and another square size), the portable ONNX form in stock ONNX Runtime, TVM Relax from
torch and from ONNX, and the saved Relax artifact run by the TVM runtime alone.

Tolerances follow ``OFFICIAL_MODEL.md`` section 12: a float32 computation of this network carries the
rounding error the float32 reference shows against the float64 reference; a backend computes the
same thing in another summation order, so its error against the float64 reference may be that error
with a 10x margin (floored at a few ulps of the output scale, for values the float32 reference
happens to get exact). At the export size the logits must also hold the original network's float32
logits within section 12's ``1e-4``. A real mistake moves the logits by 2e-3 to 1.6 (section 12).

Exports and compilations are shared by module-scoped fixtures: one dynamic-size ONNX export (about
a minute on 2 cores), one Relax compilation from torch and one from ONNX, both at the export size (about 25 s each):
a Relax compile of this network with symbolic height and width spends more than ten minutes in TVM's
arithmetic simplifier during code generation, so the Relax checks fix the sizes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
import gspn_tvm
from gspn_ref.models import from_official_config
from gspn_ref.testing import official_network_state, official_network_vectors
from helpers import run_artifact_runtime_only

DATA = Path(__file__).resolve().parents[1] / "data"  # official_gspn_archs.json
EXPORT_SIZE, OTHER_SIZE = 64, 48  # the vectors' size; another square size (maps 12, 6, 3, 2)
ORIGINAL_LOGITS_ATOL = 1e-4  # OFFICIAL_MODEL.md section 12: a float32 port on the original's logits
MARGIN = 10  # a backend's error may be 10x the float32 reference's own (section 12)
FLOOR_ULPS = 8  # ... and at least this many float32 ulps of the output scale
EPS32 = torch.finfo(torch.float32).eps


# --- the network and its references ----------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors():
    return official_network_vectors()


@pytest.fixture(scope="module")
def tiny16(vectors):
    """The original's tiny16 network, its state dict loaded strictly, eval mode, float32."""
    model = from_official_config(json.loads(str(vectors["config"])))
    model.load_state_dict(official_network_state(vectors), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny16_float64(tiny16):
    return copy.deepcopy(tiny16).double()


@pytest.fixture(scope="module")
def inputs(vectors):
    """size -> input: the vectors' input at the export size, a random batch of 3 at the other size."""
    other = torch.randn(3, 3, OTHER_SIZE, OTHER_SIZE, generator=torch.Generator().manual_seed(48))
    return {EXPORT_SIZE: torch.from_numpy(vectors["input"]), OTHER_SIZE: other}


@pytest.fixture(scope="module")
def reference(tiny16, tiny16_float64, inputs):
    """size -> (float32 eager logits, float64 eager logits) with the reference kernels."""
    assert not gspn_tvm.is_enabled()
    with torch.no_grad():
        return {size: (tiny16(x), tiny16_float64(x.double())) for size, x in inputs.items()}


def allowed_error(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """Error against the float64 reference a float32 backend may have (module docstring)."""
    own = (ref32.double() - ref64).abs().max().item()
    return MARGIN * max(own, FLOOR_ULPS * EPS32 * ref64.abs().max().item())


def assert_agrees(actual, size: int, reference, what: str, vectors=None) -> float:
    """``actual`` logits at ``size`` within :func:`allowed_error`; also the original's logits at the
    export size. Returns the max difference to the float32 eager logits (for the log)."""
    actual = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual)
    ref32, ref64 = reference[size]
    assert actual.shape == ref32.shape and actual.dtype == torch.float32, (what, actual.shape, actual.dtype)
    error, allowed = (actual.double() - ref64).abs().max().item(), allowed_error(ref32, ref64)
    assert error <= allowed, f"{what} at {size}: max |backend - float64 reference| {error:.3e} > {allowed:.3e}"
    if vectors is not None and size == EXPORT_SIZE:
        original = (actual - torch.from_numpy(vectors["logits"])).abs().max().item()
        assert original <= ORIGINAL_LOGITS_ATOL, f"{what}: max |backend - original logits| {original:.3e}"
    diff = (actual - ref32).abs().max().item()
    print(f"{what} at {size}: max |backend - eager| {diff:.2e}, vs float64 {error:.2e} (allowed {allowed:.2e})")
    return diff


def test_references_are_meaningful(reference, vectors):
    """The float32 reference holds the original's logits, and its own float32 error is small and nonzero
    (else the derived tolerances would be vacuous or zero)."""
    ref32, ref64 = reference[EXPORT_SIZE]
    assert (ref32 - torch.from_numpy(vectors["logits"])).abs().max().item() <= ORIGINAL_LOGITS_ATOL
    for size, (r32, r64) in reference.items():
        assert 0 < allowed_error(r32, r64) <= 1e-4 * r64.abs().max().item(), size


# --- TVM kernels in torch eager ------------------------------------------------------------------


def logits_and_gradients(model: torch.nn.Module, x: torch.Tensor):
    """Logits, input gradient and parameter gradients of ``sum(logits * w)`` for a fixed random ``w``."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    logits = model(x)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (logits * weights.to(logits.dtype)).sum().backward()
    grads = {"input": x.grad.detach().clone()} | {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def test_tvm_kernels_forward_and_backward(tiny16, tiny16_float64, inputs, reference, vectors):
    x = inputs[EXPORT_SIZE]
    _, ref32 = logits_and_gradients(tiny16, x)
    _, ref64 = logits_and_gradients(tiny16_float64, x.double())
    gspn_tvm.enable()
    try:
        logits, grads = logits_and_gradients(tiny16, x)
        with torch.no_grad():
            other = tiny16(inputs[OTHER_SIZE])
    finally:
        gspn_tvm.disable()
    assert_agrees(logits, EXPORT_SIZE, reference, "TVM kernels", vectors)
    assert_agrees(other, OTHER_SIZE, reference, "TVM kernels")
    assert list(grads) == list(ref64) and len(grads) == 1 + len(list(tiny16.parameters()))
    # The float32 rounding level of this backward pass: the float32 reference's worst error on any
    # gradient, relative to that gradient's scale (one tensor alone can be luckily exact).
    scale = {name: max(g.abs().max().item(), 1e-30) for name, g in ref64.items()}
    own = max((ref32[name].double() - g).abs().max().item() / scale[name] for name, g in ref64.items())
    allowed = MARGIN * max(own, FLOOR_ULPS * EPS32)
    errors = {name: (grads[name].double() - g).abs().max().item() / scale[name] for name, g in ref64.items()}
    print(f"TVM gradients: worst relative error {max(errors.values()):.2e} (float32 reference {own:.2e})")
    failed = {name: error for name, error in errors.items() if not error <= allowed}
    assert not failed, f"gradients beyond {allowed:.2e} of their scale: {failed}"


# --- ONNX Runtime ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_custom(tiny16, inputs, tmp_path_factory):
    """The network exported once with the custom operator, batch/height/width dynamic."""
    path = tmp_path_factory.mktemp("onnx") / "tiny16_custom.onnx"
    proto = export.to_onnx(tiny16, (inputs[EXPORT_SIZE],), path)
    return path, proto


def scan_chunks(model: onnx.ModelProto) -> list[int]:
    return [onnx.helper.get_attribute_value(a) for n in model.graph.node if n.domain == "gspn" and n.op_type == "GSPNFusedScan"
            for a in n.attribute if a.name == "chunk"]  # fmt: skip


def test_onnx_custom_operator_at_the_export_size_and_another(tiny16, onnx_custom, inputs, reference, vectors):
    path, proto = onnx_custom
    # One scan node per mixer, each with its block's chunk, in block order.
    assert scan_chunks(proto) == [b["items_each_chunk"] for b in tiny16.block_chunks()]
    session = export.session(path)
    name = session.get_inputs()[0].name
    for size, x in inputs.items():
        (logits,) = session.run(None, {name: x.numpy()})
        assert_agrees(logits, size, reference, "ORT custom op", vectors)


def test_onnx_portable_in_stock_onnx_runtime(onnx_custom, inputs, reference, vectors):
    """``to_onnx(mode="portable")`` is this export passed through ``make_portable``; done here on the
    shared export rather than exporting the network a second time."""
    _, proto = onnx_custom
    portable = export.make_portable(proto)
    assert not any(n.domain == "gspn" for n in portable.graph.node)
    assert sum(n.op_type == "Scan" for n in portable.graph.node) == len(scan_chunks(proto))
    assert {o.domain for o in portable.opset_import} <= {"", "ai.onnx"}
    session = ort.InferenceSession(portable.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for size, x in inputs.items():
        (logits,) = session.run(None, {name: x.numpy()})
        assert_agrees(logits, size, reference, "ORT portable", vectors)


# --- TVM Relax -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relax_from_torch(tiny16, inputs):
    return gspn_tvm.compile_model(tiny16, (inputs[EXPORT_SIZE],), dynamic=False)


def test_relax_from_torch(relax_from_torch, inputs, reference, vectors):
    assert_agrees(relax_from_torch(inputs[EXPORT_SIZE]), EXPORT_SIZE, reference, "Relax (torch)", vectors)


def with_fixed_input_size(model: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto:
    """A copy of the one-input ``model`` with the input's sizes fixed and the shape arithmetic folded.

    TVM's ONNX importer cannot follow this network's shape arithmetic (``Range`` up to
    ``(W + a) // b + 1``, the weight normalization's row masks): the ``Range`` output loses its shape
    even with ``input_shapes`` given. Folded to constants, the export compiles.
    """
    import onnxscript

    static = onnx.ModelProto()
    static.CopyFrom(model)
    static.graph.ClearField("value_info")
    (value,) = static.graph.input
    for dim, size in zip(value.type.tensor_type.shape.dim, shape):
        dim.Clear()
        dim.dim_value = size
    for value in static.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.Clear()
                dim.dim_value = shape[0]
    return onnxscript.optimizer.optimize(static)


def test_relax_from_onnx(onnx_custom, inputs, reference, vectors):
    _, proto = onnx_custom
    x = inputs[EXPORT_SIZE]
    static = with_fixed_input_size(proto, tuple(x.shape))
    assert not any(n.op_type in ("Range", "Shape") for n in static.graph.node)
    assert scan_chunks(static) == scan_chunks(proto)
    compiled = gspn_tvm.compile_onnx(static)
    assert_agrees(compiled(x), EXPORT_SIZE, reference, "Relax (ONNX)", vectors)


def test_saved_relax_artifact_runs_with_the_tvm_runtime_alone(relax_from_torch, inputs, reference, vectors, tmp_path):
    artifact = relax_from_torch.save(tmp_path / "tiny16")
    (logits,), stdout = run_artifact_runtime_only(artifact, [inputs[EXPORT_SIZE].numpy()], tmp_path)
    assert "rejected: x: " in stdout, stdout  # a wrong input is refused naming the argument
    assert_agrees(logits, EXPORT_SIZE, reference, "Relax artifact, runtime only", vectors)
