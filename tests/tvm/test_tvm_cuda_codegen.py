"""CUDA kernels of gspn::scan, checked without a GPU: TVM generates the CUDA source, nvcc compiles
it for sm_90 (H100), and the source is one kernel per scan with a barrier inside the line loop.

Skipped only where ``nvcc`` is absent (the reason is printed). Running them on a GPU is
``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from gspn_ref import DIRECTIONS
from gspn_tvm import build, compute

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: CUDA kernels cannot be compiled here")

FUNCTIONS = [compute.forward_name(d) for d in DIRECTIONS] + [compute.backward_name(d) for d in DIRECTIONS]
#: The row-scan forwards also come with 1024 threads per block, for rows longer than 1024.
WIDE_FUNCTIONS = [f"gspn_scan_forward_{d}_wide" for d in ("t2b", "b2t")]
#: Line pipelines (one thread per position) for lines of up to 64, 256 and 1024 positions.
LINE_FUNCTIONS = {f"gspn_scan_forward_{d}_lines{threads}": threads for d in DIRECTIONS for threads in (64, 256, 1024)}


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def cuda_source(request):
    executable = build.compile_scan("cuda", request.param)
    (device_module,) = executable.mod.imports
    return request.param, device_module.inspect_source("cuda")


def _kernel_bodies(source: str) -> dict[str, str]:
    """Kernel name -> body text, for every ``__global__`` definition in ``source``."""
    bodies = {}
    for match in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\) \{', source):
        depth, index = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(source[index], 0)
            index += 1
        bodies[match.group(1)] = source[match.end() : index]
    return bodies


def test_one_kernel_per_scan(cuda_source):
    dtype, source = cuda_source
    bodies = _kernel_bodies(source)
    print(dtype, sorted(bodies))
    assert sorted(bodies) == sorted(f"{name}_kernel" for name in FUNCTIONS + WIDE_FUNCTIONS + list(LINE_FUNCTIONS))


def test_line_pipeline_structure(cuda_source):
    """Each line pipeline: its threads per block, a loop over tiles of 8 lines whose 8 steps each end
    in one barrier (plus one after clearing the line buffers), no 64-bit division by C or G inside
    the tile loop (the plane's offsets are computed once), one global load per input and line."""
    _, source = cuda_source
    bodies = _kernel_bodies(source)
    for name, threads in LINE_FUNCTIONS.items():
        signature = re.search(rf'__launch_bounds__\((\d+)\) {name}_kernel\(', source)
        assert signature and int(signature.group(1)) == threads, name
        body = bodies[f"{name}_kernel"]
        tile_loop = re.search(r"for \(int64_t s0 = \(int64_t\)0; s0 < \(\([HW] \+ \(int64_t\)7\) >> \(int64_t\)3\); \+\+s0\) \{", body)
        assert tile_loop, f"{name}: no loop over tiles of 8 lines"
        inside = body[tile_loop.end():]
        assert body.count("__syncthreads();") == 1 + 8 and inside.count("__syncthreads();") == 8, name
        assert not re.search(r"[/%] [CG]\)", inside), f"{name}: division by C or G inside the tile loop"
        for array in ("x_ptr", "lam_ptr", "gl_ptr", "gm_ptr", "gr_ptr"):
            loads = len(re.findall(rf"\b{array}\[", inside))
            assert loads == 8, (name, array, loads)


def test_wide_row_forwards_launch_1024_threads(cuda_source):
    """The wide variants are the same kernels with 1024 threads per block; every other kernel 256."""
    _, source = cuda_source
    bounds = dict((name, int(threads)) for threads, name in
                  re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(', source))  # fmt: skip
    print(bounds)
    assert {name: bounds[f"{name}_kernel"] for name in WIDE_FUNCTIONS} == dict.fromkeys(WIDE_FUNCTIONS, 1024)
    assert {name: bounds[f"{name}_kernel"] for name in FUNCTIONS} == dict.fromkeys(FUNCTIONS, 256)
    assert {name: bounds[f"{name}_kernel"] for name in LINE_FUNCTIONS} == LINE_FUNCTIONS


def test_cuda_forward_variant_by_line_length():
    """Lines of up to 64, 256, 1024 positions run the line pipeline of that many threads; longer
    rows the wide kernel, longer columns the default one; the CPU always its one kernel."""
    from types import SimpleNamespace

    import torch

    from gspn_tvm import kernels

    def fake(device, H, W):
        return SimpleNamespace(device=torch.device(device), shape=(1, 2, H, W))

    base = compute.forward_name("t2b")
    assert kernels._forward_symbol(base, "t2b", fake("cuda", 5000, 56)) == base + "_lines64"
    assert kernels._forward_symbol(base, "t2b", fake("cuda", 8, 64)) == base + "_lines64"
    assert kernels._forward_symbol(base, "b2t", fake("cuda", 8, 65)) == base + "_lines256"
    assert kernels._forward_symbol(base, "l2r", fake("cuda", 1024, 5000)) == base + "_lines1024"
    assert kernels._forward_symbol(base, "t2b", fake("cuda", 8, 1025)) == base + "_wide"
    assert kernels._forward_symbol(base, "r2l", fake("cuda", 1025, 8)) == base
    assert kernels._forward_symbol(base, "t2b", fake("cpu", 8, 56)) == base


def test_barrier_between_lines(cuda_source):
    """The loop over lines runs inside the kernel (one launch for the whole scan) and synchronizes."""
    _, source = cuda_source
    for name, body in _kernel_bodies(source).items():
        if "_lines" in name:
            continue  # test_line_pipeline_structure
        line_loop = re.search(r"for \(int64_t ([sr]) = \(int64_t\)0; \1 < [HW]; \+\+\1\) \{", body)
        assert line_loop, f"{name}: no loop over lines inside the kernel"
        assert "__syncthreads();" in body[line_loop.end() :], f"{name}: no barrier inside the line loop"
        assert "extern __shared__" in body, f"{name}: previous line not kept in shared memory"


def test_nvcc_compiles_for_sm90(cuda_source, tmp_path):
    dtype, source = cuda_source
    path = tmp_path / f"gspn_scan_{dtype}.cu"
    path.write_text(source)
    result = subprocess.run(
        [NVCC, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "scan.cubin"), str(path)],
        capture_output=True,
        text=True,
    )
    print(result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "scan.cubin").stat().st_size > 0


def test_cuda_adjoint_falls_back_beyond_shared_memory_and_warns_once(caplog):
    """The limit lives with the CUDA schedule; a slice too large for shared memory runs the
    reference, and says so once per process (no GPU needed: only the decision is tested)."""
    from types import SimpleNamespace

    import torch

    from gspn_tvm import kernels
    from gspn_tvm.schedules import cuda as cuda_schedule

    def fake(C, G, H, W):
        x = SimpleNamespace(dtype=torch.float32, device=torch.device("cuda"), shape=(1, C, H, W))
        return x, SimpleNamespace(shape=(1, G, H, W))

    small, large = fake(8, 8, 16, 16), fake(64, 1, 16, 1024)
    assert cuda_schedule.backward_fits(8, 8, 16) and not cuda_schedule.backward_fits(64, 1, 1024)
    # Measured on an H100: (16, 8, 1024, 1024) with G = 8 failed to launch, lines of 300 ran.
    assert cuda_schedule.backward_fits(8, 8, 300) and not cuda_schedule.backward_fits(8, 8, 1024)
    kernels._warned_fallbacks.clear()
    with caplog.at_level("WARNING", logger="gspn_tvm.kernels"):
        assert kernels.has_kernel(*small, "t2b", backward=True)
        assert not kernels.has_kernel(*large, "t2b", backward=True)
        assert not kernels.has_kernel(*large, "t2b", backward=True)
        assert kernels.has_kernel(*large, "t2b", backward=False)
    warnings = [r for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(warnings) == 1 and "reference adjoint runs" in warnings[0].getMessage()
