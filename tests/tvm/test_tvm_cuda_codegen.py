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
    assert sorted(bodies) == sorted(f"{name}_kernel" for name in FUNCTIONS)


def test_barrier_between_lines(cuda_source):
    """The loop over lines runs inside the kernel (one launch for the whole scan) and synchronizes."""
    _, source = cuda_source
    for name, body in _kernel_bodies(source).items():
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
    kernels._warned_fallbacks.clear()
    with caplog.at_level("WARNING", logger="gspn_tvm.kernels"):
        assert kernels.has_kernel(*small, "t2b", backward=True)
        assert not kernels.has_kernel(*large, "t2b", backward=True)
        assert not kernels.has_kernel(*large, "t2b", backward=True)
        assert kernels.has_kernel(*large, "t2b", backward=False)
    warnings = [r for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(warnings) == 1 and "reference adjoint runs" in warnings[0].getMessage()
