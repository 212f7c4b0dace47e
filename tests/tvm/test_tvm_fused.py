"""TVM kernels of the fused scan ``gspn::fused_scan`` (docs/operator.md, "The fused scan").

The compiled forward and the composed adjoint (:mod:`gspn_tvm.kernels`) are held to the float64
reference through the public conformance API (``gspn_ref.testing``); the registered operator is
differentiated inside ``gspn_tvm.enabled()``; the schedules are checked for their structure (parallel
tasks, vectorized normalization, no plane-sized workspace); the CUDA source compiles with nvcc for
sm_90 (no GPU needed); whole models calling the fused op compile with Relax, from torch.export and
from a one-node ONNX model.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from tvm import s_tir

import gspn_tvm
from gspn_ref import DIRECTIONS, gspn_fused_scan, gspn_fused_scan_ref
from gspn_ref.testing import ScanCase, assert_fused_scan_matches, check_fused_case, fused_inputs
from gspn_tvm import build, compute, kernels
from gspn_tvm.schedules import cpu, cuda

HALF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NVCC = shutil.which("nvcc")


def test_fused_kernel_matches_reference():
    assert_fused_scan_matches(kernels.fused_scan_forward, backward=False, dtypes=HALF_DTYPES)


def test_registered_fused_op_and_its_adjoint_match_reference(monkeypatch):
    """``torch.ops.gspn.fused_scan`` differentiated with autograd inside ``gspn_tvm.enabled()``: the
    TVM forward and the composed TVM adjoint run (counted) and equal the reference."""
    calls = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)

        return wrapper

    monkeypatch.setattr(kernels, "fused_scan_forward", counted("forward", kernels.fused_scan_forward))
    monkeypatch.setattr(kernels, "fused_scan_backward", counted("backward", kernels.fused_scan_backward))
    with gspn_tvm.enabled():
        assert_fused_scan_matches(gspn_fused_scan, backward=True, dtypes=HALF_DTYPES)
    assert calls["forward"] > 0 and calls["backward"] > 0, calls
    # off again: the reference kernels serve the op
    before = dict(calls)
    inputs = fused_inputs(ScanCase(1, 2, 1, 3, 4, "t2b", 0))
    gspn_fused_scan(*inputs, "t2b", 0)
    assert calls == before


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("C", "G", "H", "W", "chunk"), [(2, 1, 19, 139, 0), (3, 3, 70, 17, 5), (2, 2, 8, 64, 33)])
def test_fused_kernels_at_tile_and_vector_edges(direction, C, G, H, W, chunk):
    """Sides beyond one register block (8) and one column tile (``TILE_LINES``), not multiples of
    either, chunked, grouped: forward and adjoint of the kernels called directly."""
    case = ScanCase(1, C, G, H, W, direction, chunk)
    for dtype in (torch.float32, torch.bfloat16):
        check_fused_case(kernels.fused_scan_forward, case, dtype, backward=False)

    def with_tvm_adjoint(*args):
        return _TVMFused.apply(*args)

    check_fused_case(with_tvm_adjoint, case, torch.float32, backward=True, logit_scale=8.0)


class _TVMFused(torch.autograd.Function):
    """The TVM forward and adjoint kernels wired for autograd (for direct calls of the kernels)."""

    @staticmethod
    def forward(ctx, u, lam, al, am, ar, gate, skip, direction, chunk):
        ctx.save_for_backward(u, lam, al, am, ar, gate, skip)
        ctx.direction, ctx.chunk = direction, chunk
        return kernels.fused_scan_forward(u, lam, al, am, ar, gate, skip, direction, chunk)

    @staticmethod
    def backward(ctx, gy):
        grads = kernels.fused_scan_backward(gy.contiguous(), *ctx.saved_tensors, ctx.direction, ctx.chunk)
        return (*grads, None, None)


def test_float64_runs_the_reference():
    inputs = fused_inputs(ScanCase(1, 2, 2, 5, 6, "r2l", 2), torch.float64)
    y = kernels.fused_scan_forward(*inputs, "r2l", 2)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, gspn_fused_scan_ref(*inputs, "r2l", 2), rtol=0, atol=0)


def test_invalid_arguments_are_rejected_before_the_kernel():
    u, lam, al, am, ar, gate, skip = fused_inputs(ScanCase(1, 4, 2, 5, 6, "t2b", 0))
    with pytest.raises(ValueError, match=r"gate: expected shape \(1, 4, 5, 6\)"):
        kernels.fused_scan_forward(u, lam, al, am, ar, gate[:, :, :4], skip, "t2b", 0)
    with pytest.raises(TypeError, match="skip: expected dtype torch.float32"):
        kernels.fused_scan_forward(u, lam, al, am, ar, gate, skip.double(), "t2b", 0)
    with pytest.raises(ValueError, match="direction"):
        kernels.fused_scan_forward(u, lam, al, am, ar, gate, skip, "up", 0)
    with pytest.raises(ValueError, match=r"al: .*3"):
        kernels.fused_scan_forward(u, lam, al[:, :1].expand(1, 3, 5, 6), am[:, :1].expand(1, 3, 5, 6),
                                   ar[:, :1].expand(1, 3, 5, 6), gate, skip, "t2b", 0)  # fmt: skip
    with pytest.raises(ValueError, match=r"gy: expected shape \(1, 4, 5, 6\)"):
        kernels.fused_scan_backward(u[:, :2], u, lam, al, am, ar, gate, skip, "t2b", 0)
    meta = [t.to("meta") for t in (u, lam, al, am, ar, gate, skip)]
    with pytest.raises(ValueError, match="expected a tensor on one of"):
        kernels.fused_scan_forward(*meta, "t2b", 0)


# -- structure of the schedules -------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fused_cpu_schedule_is_parallel_without_plane_sized_buffers(direction):
    func = cpu.schedule_fused_forward(direction, "float32")
    assert "T.parallel(" in func.script(), "planes not parallel"
    assert func.attrs["global_symbol"] == compute.fused_forward_name(direction)
    sch = s_tir.Schedule(func)
    line = sch.get(sch.get_sblock("plane")).alloc_buffers
    # the carried state: one line in float32 (and the new line, for row scans); never the plane
    assert line and all(len(b.shape) == 1 and str(b.dtype) == "float32" for b in line), [b.shape for b in line]
    if direction in ("l2r", "r2l"):
        staged = sch.get(sch.get_sblock("tile")).alloc_buffers
        # u, lam, three logits, gate, skip, and h (turned into y in place by the "gate" block)
        assert len(staged) == 8, [b.name for b in staged]
        for buffer in staged:
            assert int(buffer.shape[0]) == cpu.TILE_LINES, f"{buffer.name}: {list(buffer.shape)}"
            assert str(buffer.shape[1]).replace(" ", "") == f"H+T.int64({compute.TILE_PAD})", buffer.name
        sch.get_sblock("gate"), sch.get_sblock("stage_in_8x8_gate"), sch.get_sblock("stage_in_8x8_skip"), sch.get_sblock("stage_out_8x8")


@pytest.fixture(scope="module")
def fused_cpu_llvm():
    """LLVM IR of the float32 CPU fused library, one chunk per function."""
    source = build.compile_scan("cpu", "float32", "fused").mod.inspect_source("ll")
    return [chunk for chunk in re.split(r"\n(?=define )", source) if chunk.startswith("define")]


def test_fused_cpu_normalization_is_vectorized(fused_cpu_llvm):
    """Each of the eight parallel task bodies (a plane kernel and a lane kernel per direction)
    normalizes the weights in vector registers: the sigmoid's range reduction (``floor``) and the
    divisions on vectors, no libm ``exp`` call."""
    tasks = [chunk for chunk in fused_cpu_llvm if re.match(r"define [^@]*@__tvm_parallel_lambda", chunk)]
    assert len(tasks) == 2 * len(DIRECTIONS), len(tasks)
    for body in tasks:
        assert re.search(r"llvm\.floor\.v\d+f32", body), "sigmoid not vectorized"
        assert re.search(r"fdiv (?:\w+ )*<\d+ x float>", body), "normalization not vectorized"
        assert re.search(r"store <\d+ x float>", body), "no vector stores"
        assert not re.search(r"call [^\n]*@expf?\(", body), "a libm exp call per element"
    # the prefetches survive code generation: the column scans' of the next channel (7 inputs), and
    # b2t's of the line ahead (7 inputs and the output)
    prefetching = [body for body in tasks if body.count("call void @llvm.prefetch") >= 7]
    assert len(prefetching) == 3, [body.count("call void @llvm.prefetch") for body in tasks]


# float32 only: the fused CUDA source is ~35k lines per dtype (18 kernels with the normalization
# unrolled), 20 s of nvcc each; the half-precision code paths are compiled by the scan's nvcc test
# (tests/tvm/test_tvm_cuda_codegen.py) and the fused float16/bfloat16 kernels ran correct on an
# H100 (scripts/gpu_check.sh, docs/results/gpu_check_h100.json).
@pytest.fixture(scope="module", params=["float32"])
def fused_cuda_source(request):
    if NVCC is None:
        pytest.skip("nvcc not found on PATH: CUDA kernels cannot be compiled here")
    (device_module,) = build.compile_scan("cuda", request.param, "fused").mod.imports
    return request.param, device_module.inspect_source("cuda")


def test_fused_cuda_kernels_compile_for_sm90(fused_cuda_source, tmp_path):
    dtype, source = fused_cuda_source
    kernels_found = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)
    wide = {f"{compute.fused_forward_name(d)}_wide_kernel" for d in ("t2b", "b2t")}  # 1024 threads, long rows
    lines = {f"{compute.fused_forward_name(d)}_lines{n}_kernel" for d in DIRECTIONS for n in (64, 256, 1024)}
    assert set(kernels_found) == {f"{compute.fused_forward_name(d)}_kernel" for d in DIRECTIONS} | wide | lines
    assert source.count("__syncthreads();") >= len(DIRECTIONS) and "extern __shared__" in source
    assert "threadIdx.x" in source and cuda.THREADS == 256
    path = tmp_path / f"gspn_fused_{dtype}.cu"
    path.write_text(source)
    result = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "fused.cubin"), str(path)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "fused.cubin").stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction, chunk", [("l2r", 0), ("r2l", 3), ("t2b", 0)])
def test_composed_fused_scan_matches_reference(direction, chunk, dtype):
    """The composed form (normalize + compiled scan + gate/skip in float32, rounded once), which the
    CUDA fused op runs for long columns, meets the fused scan's contract; here on the CPU kernels."""
    from gspn_ref.testing import ScanCase, check_fused_case
    from gspn_tvm.kernels import fused_scan_composed

    check_fused_case(fused_scan_composed, ScanCase(2, 4, 2, 300, 37, direction, chunk), dtype, backward=False)


def test_cuda_fused_runs_composed_only_for_long_columns():
    assert cuda.fused_runs_composed("l2r", 257, 8) and cuda.fused_runs_composed("r2l", 1024, 1024)
    assert cuda.fused_runs_composed("l2r", 4096, 8)
    assert not cuda.fused_runs_composed("l2r", 256, 1024) and not cuda.fused_runs_composed("t2b", 1024, 1024)


@pytest.fixture(scope="module")
def packed_logits_kernels():
    """The CPU fused forwards reading the logits packed in one tensor (the Relax lowering's variant
    for ``chunk(3, dim=1)`` logits), float32, every direction."""
    import tvm

    functions = {d: cpu.schedule_fused_forward(d, "float32", packed_logits=True).with_attr("global_symbol", d)
                 for d in DIRECTIONS}  # fmt: skip
    with tvm.transform.PassContext(opt_level=3):
        library = tvm.compile(tvm.IRModule(functions), target=tvm.target.Target(build.cpu_target()))
    return {d: library[d] for d in DIRECTIONS}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("B", "C", "G", "H", "W", "chunk"), [(2, 6, 3, 13, 139, 4), (1, 4, 4, 9, 7, 0)])
def test_packed_logits_kernel_equals_the_three_tensor_kernel(packed_logits_kernels, direction, B, C, G, H, W, chunk):
    """Logits read in place from one ``(B, 3 G, H, W)`` tensor through strided views give the same
    bits as the library kernel given ``logits.chunk(3, dim=1)`` as three tensors (same arithmetic),
    and both match the reference."""
    import tvm

    u, lam, _, _, _, gate, skip = fused_inputs(ScanCase(B, C, G, H, W, direction, chunk), seed=B + H)
    logits = torch.randn(B, 3 * G, H, W, generator=torch.Generator().manual_seed(W)) * 2
    al, am, ar = logits.chunk(3, dim=1)  # views into logits, as in a model
    expected = kernels.fused_scan_forward(u, lam, al, am, ar, gate, skip, direction, chunk)
    y = torch.empty_like(u)
    packed_logits_kernels[direction](*[tvm.runtime.from_dlpack(t) for t in (u, lam, logits, gate, skip, y)], chunk)
    print(f"{direction} max |packed - three tensors| = {(y - expected).abs().max().item():.3g}")
    assert torch.equal(y, expected)
    reference = gspn_fused_scan_ref(*(t.double() for t in (u, lam, al, am, ar, gate, skip)), direction, chunk)
    torch.testing.assert_close(y.double(), reference, rtol=1e-4, atol=1e-4 * (H + W))


@pytest.fixture(scope="module")
def projected_kernels():
    """The CPU fused lane kernels that project ``lam``, logits, ``gate`` and ``skip`` from a proxy of
    3 channels (the Relax lowering's kernel for GSPN-T's mixers), float32, every direction."""
    import tvm

    functions = {d: cpu.schedule_fused_forward_lanes_projected(d, "float32", 3).with_attr("global_symbol", d)
                 for d in DIRECTIONS}  # fmt: skip
    with tvm.transform.PassContext(opt_level=3):
        library = tvm.compile(tvm.IRModule(functions), target=tvm.target.Target(build.cpu_target()))
    return {d: library[d] for d in DIRECTIONS}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("B", "C", "G", "H", "W", "chunk"), [(2, 32, 4, 5, 7, 2), (1, 16, 16, 1, 9, 0), (1, 48, 3, 9, 1, 3)])
def test_projected_lane_kernel_matches_reference(projected_kernels, direction, B, C, G, H, W, chunk):
    """The kernel's own 1x1 projections of the proxy, then the fused scan, against the float64
    reference given torch's convolutions of the same proxy and weights (groups, tails, 1-wide maps)."""
    import tvm

    gen = torch.Generator().manual_seed(C + H)
    u, proxy = torch.randn(B, C, H, W, generator=gen), torch.randn(B, 3, H, W, generator=gen)
    w_lam, w_gate, w_skip = (torch.randn(C, 3, 1, 1, generator=gen) for _ in range(3))
    w_logits = torch.randn(3 * G, 3, 1, 1, generator=gen) * 2
    y = torch.empty_like(u)
    args = (u, proxy, w_lam, w_logits, w_gate, w_skip, y)
    projected_kernels[direction](*[tvm.runtime.from_dlpack(t) for t in args], chunk)
    conv = torch.nn.functional.conv2d
    p, w = proxy.double(), [t.double() for t in (w_lam, w_logits, w_gate, w_skip)]
    al, am, ar = conv(p, w[1]).chunk(3, dim=1)
    expected = gspn_fused_scan_ref(u.double(), conv(p, w[0]), al, am, ar, conv(p, w[2]), conv(p, w[3]), direction, chunk)
    print(f"{direction} max |projected - reference| = {(y.double() - expected).abs().max().item():.3g}")
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4 * (H + W))
