"""Models calling the fused scan, compiled whole by TVM Relax (``gspn_tvm.compile_model`` from
torch.export, ``gspn_tvm.compile_onnx`` from a one-node ``gspn::GSPNFusedScan`` ONNX model), against
torch eager with the reference kernels and the float64 reference."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from gspn_ref import gspn_fused_scan, gspn_fused_scan_ref
from gspn_ref.onnx_op import DOMAIN, FUSED_INPUT_NAMES, FUSED_OP_TYPE, FUSED_OUTPUT_NAMES, OP_VERSION
from gspn_ref.testing import ScanCase, assert_close_scaled, fused_inputs
from gspn_tvm import relax_frontend
from gspn_tvm.relax_frontend import compile_model, compile_onnx

C, G = 4, 2


class FusedMixer(torch.nn.Module):
    """Logits, gate and skip from 1x1 convolutions of ``x``; two fused scans (a row and a chunked
    column direction), summed."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.logits = torch.nn.Conv2d(C, 3 * G, 1)
        self.lam = torch.nn.Conv2d(C, C, 1)
        self.gate = torch.nn.Conv2d(C, C, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        al, am, ar = self.logits(x).chunk(3, dim=1)
        lam, gate = torch.sigmoid(self.lam(x)), self.gate(x)
        skip = x * 0.5
        return (gspn_fused_scan(x, lam, al, am, ar, gate, skip, "t2b", 0)
                + gspn_fused_scan(x, lam, al, am, ar, gate, skip, "r2l", 3))  # fmt: skip


class SeparateLogitsMixer(FusedMixer):
    """The logits from three convolutions (no split to read in place)."""

    def __init__(self):
        super().__init__()
        self.logit_convs = torch.nn.ModuleList(torch.nn.Conv2d(C, G, 1) for _ in range(3))

    def forward(self, x):
        al, am, ar = (conv(x) for conv in self.logit_convs)
        return gspn_fused_scan(x, torch.sigmoid(self.lam(x)), al, am, ar, self.gate(x), x * 0.5, "l2r", 2)


@pytest.mark.parametrize(("model_class", "packed"), [(FusedMixer, True), (SeparateLogitsMixer, False)])
def test_compile_model_lowers_the_fused_op_and_matches_eager(monkeypatch, model_class, packed):
    """The fused op becomes the project's kernel; where its logits are the thirds of one split
    (``chunk(3, dim=1)``), the kernel that reads them in place (no copy), else the plain one."""
    lowered = []
    kernel = relax_frontend.scan_kernel

    def spy(direction, dtype, chunk, target, fused=False, packed_logits=False, lanes=False):
        lowered.append((direction, chunk, fused, packed_logits))
        return kernel(direction, dtype, chunk, target, fused, packed_logits, lanes)

    monkeypatch.setattr(relax_frontend, "scan_kernel", spy)
    model = model_class().eval()
    compiled = compile_model(model, (torch.randn(2, C, 9, 11),))
    calls = [line.split()[1] for line in compiled.executable.as_text().splitlines() if line.strip().startswith("call ")]
    if model_class is FusedMixer:
        assert sorted(lowered) == [("r2l", 3, True, True), ("t2b", 0, True, True)]
        # the split of the logits is gone: the kernels read the projection's output in place
        assert not [name for name in calls if "split" in name], calls
    else:
        assert lowered == [("l2r", 2, True, False)]
    for shape in [(2, C, 9, 11), (1, C, 13, 6)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected = model(x)
        assert_close_scaled(compiled(x), expected, torch.float32, shape[2] + shape[3] + C, f"y at {shape}")


def _one_node_model(direction: str, chunk: int | None, attributes: bool = True) -> onnx.ModelProto:
    attrs = {"direction": direction} if attributes else {}
    if chunk is not None:
        attrs["chunk"] = chunk
    node = helper.make_node(FUSED_OP_TYPE, list(FUSED_INPUT_NAMES), list(FUSED_OUTPUT_NAMES), domain=DOMAIN, **attrs)
    groups = {"al", "am", "ar"}
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", G if name in groups else C, "height", "width"])
              for name in FUSED_INPUT_NAMES]  # fmt: skip
    output = helper.make_tensor_value_info(FUSED_OUTPUT_NAMES[0], TensorProto.FLOAT, ["batch", C, "height", "width"])
    graph = helper.make_graph([node], "fused", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])


@pytest.mark.parametrize(("direction", "chunk"), [("l2r", 2), ("b2t", None)])
def test_compile_onnx_of_one_fused_node_matches_reference(direction, chunk):
    compiled = compile_onnx(_one_node_model(direction, chunk))
    for B, H, W in [(1, 6, 10), (2, 11, 5)]:
        case = ScanCase(B, C, G, H, W, direction, chunk or 0)
        inputs = fused_inputs(case, seed=H * W)
        expected = gspn_fused_scan_ref(*(t.double() for t in inputs), direction, chunk or 0)
        assert_close_scaled(compiled(*inputs), expected, torch.float32, case.n_lines, f"y {case}")


def test_compile_onnx_refuses_a_fused_node_without_direction():
    with pytest.raises(ValueError, match=f"{FUSED_OP_TYPE}: the attribute 'direction' is required"):
        compile_onnx(_one_node_model("t2b", 0, attributes=False))


class LaneMixer(torch.nn.Module):
    """A fused scan of 16 channels with logits split from one projection (the lane kernel's shapes)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.logits = torch.nn.Conv2d(16, 3 * 16, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        al, am, ar = self.logits(x).chunk(3, dim=1)
        return gspn_fused_scan(x, torch.sigmoid(x), al, am, ar, x * 0.25, x * 0.5, "l2r", 2)


@pytest.mark.parametrize("dynamic", [False, True])
def test_static_small_planes_compile_to_the_lane_kernel(monkeypatch, dynamic):
    """Compiled for a fixed size whose planes the lane kernel serves (16 channels, 6 x 7), the fused
    scan lowers to it (reading the split logits in place); compiled for any size, to the plane
    kernel. Both match eager."""
    lowered = []
    kernel = relax_frontend.scan_kernel

    def spy(direction, dtype, chunk, target, fused=False, packed_logits=False, lanes=False):
        lowered.append((packed_logits, lanes))
        return kernel(direction, dtype, chunk, target, fused, packed_logits, lanes)

    monkeypatch.setattr(relax_frontend, "scan_kernel", spy)
    model = LaneMixer().eval()
    x = torch.randn(2, 16, 6, 7, generator=torch.Generator().manual_seed(1))
    compiled = compile_model(model, (x,), dynamic=dynamic)
    assert lowered == [(True, not dynamic)]
    with torch.no_grad():
        expected = model(x)
    assert_close_scaled(compiled(x), expected, torch.float32, 6 + 7 + 16, "y")


@pytest.mark.parametrize("dynamic", [False, True])
def test_mixer_projections_are_computed_inside_the_scan(dynamic):
    """GSPN-T's mixer, compiled for a fixed size or for any size: the fused scan's ``lam``, logits,
    ``gate`` and ``skip`` (1x1 convolutions of one 16-channel proxy) are computed by the lane kernel
    itself, and their convolutions are gone from the compiled program; the output matches eager at
    the traced size and (compiled for any size) at another one."""
    from gspn_ref.models.network import GSPNMixer

    torch.manual_seed(0)
    model = GSPNMixer(16, items_each_chunk=2).eval()
    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(2))
    compiled = compile_model(model, (x,), dynamic=dynamic)
    calls = [line.split()[1] for line in compiled.executable.as_text().splitlines() if line.strip().startswith("call ")]
    projected = [name for name in calls if name.endswith("_lanes_projected16")]
    convolutions = [name for name in calls if "conv2d" in name]
    print(calls)
    # in_proj, the depthwise conv, x_conv_down, m_conv, out_proj: not the four projections of the proxy
    assert len(projected) == 1 and len(convolutions) == 5, calls
    for shape in [(1, 16, 6, 6)] + ([(1, 16, 11, 11)] if dynamic else []):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected = model(x)
        assert_close_scaled(compiled(x), expected, torch.float32, shape[2] + shape[3] + 16, f"mixer output at {shape}")
