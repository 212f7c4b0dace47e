"""GPU check of the TVM CUDA scan kernels: compile here, run on a machine where nothing is installed.

``prepare`` (here, needs the project's .venv with TVM and nvcc) writes ``--artifact``:
    scan_cuda_<dtype>.so   TVM libraries (host code + sm_90 device code) for float32/float16/bfloat16
    lib/                   the TVM runtime that loads them (libtvm_runtime.so, libtvm_runtime_cuda.so)
    wheels/                the apache-tvm-ffi wheel for the GPU machine's Python (3.12)
    manifest.json          function names, target, dtypes
``run`` (on the GPU machine, via scripts/gpu_check.sh run) needs python3 with torch + CUDA only:
    1. correctness of forward and adjoint against the torch reference (gspn_ref) on the GPU, for all
       directions, chunk 0 and 3, float32/float16/bfloat16, odd shapes, H = 1, W = 1, groups;
    2. timings with CUDA events (median of many, warm) at (16, 8, 1024, 1024) and (1, 192, 56, 56),
       forward and backward, as a fraction of the device-to-device copy bandwidth measured in the
       same run, against the torch reference and against a baseline that launches one CUDA kernel
       per line (the original GSPN scheme).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")
TVM_FFI_REQUIREMENT = "apache-tvm-ffi=={version}"
#: Pure-Python wheels the run step needs beside torch (gspn_ref.testing uses Hypothesis).
PURE_WHEELS = ("hypothesis=={hypothesis}", "sortedcontainers")
TIMED_SHAPES = ((16, 8, 1024, 1024), (1, 192, 56, 56))


# ----------------------------------------------------------------------------------- prepare (here)


def prepare(artifact: Path, python_version: str) -> None:
    sys.path.insert(0, str(ROOT))
    import tvm
    import tvm_ffi

    from gspn_tvm import build, compute
    from gspn_ref import DIRECTIONS

    artifact.mkdir(parents=True, exist_ok=True)
    for dtype in DTYPES:
        executable = build.compile_scan("cuda", dtype)
        executable.export_library(str(artifact / f"scan_cuda_{dtype}.so"))
        print(f"compiled scan_cuda_{dtype}.so")
    lib = artifact / "lib"
    lib.mkdir(exist_ok=True)
    tvm_lib = Path(tvm.__file__).parent / "lib"
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(tvm_lib / name, lib / name)
    wheels = artifact / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    ffi_version = tvm_ffi.__version__
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
         "--python-version", python_version, "--platform", "manylinux_2_28_x86_64", "--platform",
         "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", str(wheels),
         TVM_FFI_REQUIREMENT.format(version=ffi_version)],
        check=True,
    )
    import hypothesis

    pure = [w.format(hypothesis=hypothesis.__version__) for w in PURE_WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                    *pure], check=True)  # fmt: skip
    manifest = {
        "target": build.cuda_target(),
        "tvm": tvm.__version__,
        "tvm_ffi": ffi_version,
        "dtypes": list(DTYPES),
        "forward": {d: compute.forward_name(d) for d in DIRECTIONS},
        "backward": {d: compute.backward_name(d) for d in DIRECTIONS},
    }
    (artifact / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest, indent=2))


# ----------------------------------------------------------------------------- run (GPU machine)


def load_libraries(artifact: Path) -> tuple[dict, dict]:
    """The TVM scan libraries by dtype, loaded with the carried runtime only (no TVM compiler)."""
    import torch
    import tvm_ffi

    torch.cuda.init()  # torch's libcudart.so.13 is now loaded; libtvm_runtime_cuda.so links against it
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        ctypes.CDLL(str(artifact / "lib" / name), mode=ctypes.RTLD_GLOBAL)
    manifest = json.loads((artifact / "manifest.json").read_text())
    libraries = {dtype: tvm_ffi.load_module(str(artifact / f"scan_cuda_{dtype}.so")) for dtype in manifest["dtypes"]}
    return libraries, manifest


def cuda_median_ms(fn, repeat: int = 30, warmup: int = 5) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


PER_LINE_KERNEL = r"""
extern "C" __global__ void scan_one_row(const float* x, const float* lam, const float* gl, const float* gm,
                                        const float* gr, float* h, long long planes, long long H, long long W,
                                        long long row) {
  long long plane = blockIdx.y;
  long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (plane >= planes || j >= W) return;
  long long at = (plane * H + row) * W + j;
  float value = lam[at] * x[at];
  if (row > 0) {
    const float* prev = h + (plane * H + row - 1) * W;
    float left = j > 0 ? prev[j - 1] : 0.f, right = j + 1 < W ? prev[j + 1] : 0.f;
    value += gl[at] * left + gm[at] * prev[j] + gr[at] * right;
  }
  h[at] = value;
}
"""


def per_line_baseline(B, C, H, W):
    """Forward t2b, float32, G = C, with one kernel launch per row (needs CuPy); None without CuPy."""
    try:
        import cupy
    except ImportError:
        return None
    kernel = cupy.RawKernel(PER_LINE_KERNEL, "scan_one_row")
    threads = 256
    grid = ((W + threads - 1) // threads, B * C)

    def launch(x, lam, gl, gm, gr, h):
        args = [cupy.asarray(t) for t in (x, lam, gl, gm, gr, h)]
        with cupy.cuda.ExternalStream(__import__("torch").cuda.current_stream().cuda_stream):
            for row in range(H):
                kernel(grid, (threads,), (*args, cupy.int64(B * C), cupy.int64(H), cupy.int64(W), cupy.int64(row)))

    return launch


def check_correctness(libraries, manifest) -> list[dict]:
    """Every dtype, direction, chunk 0 and 3, odd shapes, H = 1, W = 1, groups: the compiled CUDA
    forward and adjoint against the float64 reference, with the comparison of the project's
    conformance suite (``gspn_ref.testing.check_scan_case``: dtype-derived tolerances)."""
    import torch

    from gspn_ref import DIRECTIONS
    from gspn_ref.testing import ScanCase, check_scan_case

    shapes = ((2, 4, 2, 9, 7), (1, 3, 3, 1, 13), (1, 2, 1, 11, 1), (2, 6, 3, 33, 65), (1, 2, 2, 300, 257))
    rows, failures = [], 0
    for dtype_name in manifest["dtypes"]:
        dtype = getattr(torch, dtype_name)
        library = libraries[dtype_name]

        def forward(x, lam, gl, gm, gr, direction, chunk):
            h = torch.empty_like(x)
            library[manifest["forward"][direction]](x, lam, gl, gm, gr, h, chunk)
            return h

        def backward(gh, x, lam, gl, gm, gr, h, direction, chunk):
            grads = [torch.empty_like(t) for t in (x, lam, gl, gm, gr)]
            library[manifest["backward"][direction]](gh, x, lam, gl, gm, gr, h, *grads, chunk)
            return grads

        for B, C, G, H, W in shapes:
            for direction in DIRECTIONS:
                for chunk in (0, 3):
                    case = ScanCase(B, C, G, H, W, direction, chunk)
                    try:
                        check_scan_case(forward, case, dtype, backward=backward, device="cuda")
                        ok, error = True, ""
                    except AssertionError as mismatch:
                        ok, error = False, str(mismatch)
                    failures += not ok
                    rows.append({"dtype": dtype_name, "shape": [B, C, G, H, W], "direction": direction,
                                 "chunk": chunk, "ok": ok, "error": error})
                    if not ok:
                        print("MISMATCH", rows[-1])
    print(f"correctness: {len(rows) - failures}/{len(rows)} cases within tolerance")
    return rows


def _timed_or_nan(fn) -> float:
    """``cuda_median_ms(fn)``, or NaN with the error printed, so one failing kernel spares the rest."""
    try:
        return cuda_median_ms(fn)
    except Exception as error:  # reported, not fatal: the remaining timings still run
        print(f"TIMING FAILED: {error!r}")
        return float("nan")


def time_kernels(libraries, manifest) -> dict:
    import torch

    from gspn_ref import gspn_scan_backward_ref, gspn_scan_ref
    from gspn.bench.core import scan_bytes

    source = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    copy_ms = cuda_median_ms(lambda: target.copy_(source))
    bandwidth = 2 * source.numel() * 4 / (copy_ms * 1e-3)
    del source, target
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    result = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bandwidth, "rows": []}
    library = libraries["float32"]
    for B, C, H, W in TIMED_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x, lam = (torch.randn(B, C, H, W, device="cuda", generator=gen) for _ in range(2))
        gl, gm, gr = (torch.rand(B, C, H, W, device="cuda", generator=gen) / 3 for _ in range(3))
        gh = torch.randn_like(x)
        h = torch.empty_like(x)
        grads = [torch.empty_like(t) for t in (x, lam, gl, gm, gr)]
        for direction in ("t2b", "l2r"):
            forward = manifest["forward"][direction]
            backward = manifest["backward"][direction]
            tvm_fwd = _timed_or_nan(lambda: library[forward](x, lam, gl, gm, gr, h, 0))
            tvm_bwd = _timed_or_nan(lambda: library[backward](gh, x, lam, gl, gm, gr, h, *grads, 0))
            ref_fwd = cuda_median_ms(lambda: gspn_scan_ref(x, lam, gl, gm, gr, direction, 0), repeat=5, warmup=1)
            ref_bwd = cuda_median_ms(
                lambda: gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, 0), repeat=3, warmup=1
            )
            for name, tvm_ms, ref_ms in (("forward", tvm_fwd, ref_fwd), ("backward", tvm_bwd, ref_bwd)):
                moved = scan_bytes(B, C, C, H, W, torch.float32, backward=name == "backward")
                row = {"shape": [B, C, H, W], "direction": direction, "pass": name, "tvm_ms": tvm_ms,
                       "reference_ms": ref_ms, "fraction_of_copy_bw": moved / (tvm_ms * 1e-3) / bandwidth}
                result["rows"].append(row)
                print(row)
        launch = per_line_baseline(B, C, H, W)
        if launch is not None:
            baseline_ms = cuda_median_ms(lambda: launch(x, lam, gl, gm, gr, h), repeat=10, warmup=2)
            expected = gspn_scan_ref(x, lam, gl, gm, gr, "t2b", 0)
            agrees = torch.allclose(h, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
            moved = scan_bytes(B, C, C, H, W, torch.float32)
            row = {"shape": [B, C, H, W], "direction": "t2b", "pass": "forward, one launch per line",
                   "baseline_ms": baseline_ms, "agrees_with_reference": agrees,
                   "fraction_of_copy_bw": moved / (baseline_ms * 1e-3) / bandwidth}
            result["rows"].append(row)
            print(row)
    return result


def run(artifact: Path, json_path: str | None) -> int:
    sys.path[:0] = [str(ROOT)]
    libraries, manifest = load_libraries(artifact)
    correctness = check_correctness(libraries, manifest)
    timings = time_kernels(libraries, manifest)
    report = {"manifest": manifest, "correctness": correctness, "timings": timings}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 0 if all(row["ok"] for row in correctness) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--artifact", type=Path, default=ROOT / "build" / "gpu_check")
    parser.add_argument("--python-version", default="3.12", help="Python of the GPU machine (prepare)")
    parser.add_argument("--json", help="where to save the results (run)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.artifact, args.python_version)
        return 0
    return run(args.artifact.resolve(), args.json)


if __name__ == "__main__":
    sys.exit(main())
