"""GPU check of the TVM CUDA kernels: compile here, run on a machine where nothing is installed.

``prepare`` (here, needs the project's .venv with TVM and nvcc) writes ``--artifact``:
    scan_cuda_<dtype>.so   TVM libraries (host code + CUDA source) of the scan, float32/float16/bfloat16
    fused_cuda_<dtype>.so  the same for the fused scan (``gspn::fused_scan``)
    lib/                   the TVM runtime that loads them (libtvm_runtime.so, libtvm_runtime_cuda.so)
    wheels/                apache-tvm-ffi and Hypothesis wheels for the GPU machine's Python (3.12)
    manifest.json          function names, target, dtypes, the wide-row switch, the adjoint's limit
``run`` (on the GPU machine, via scripts/gpu_check.sh run) needs python3 with torch + CUDA + nvcc:
    0. the pip build of TVM keeps CUDA source in the library; loading compiles it with nvcc (sm_90)
       through a ``tvm_callback_cuda_compile`` registered here (the full TVM's tvm.support.nvcc does
       that in the package);
    1. correctness of forward and adjoint, and of the fused forward, against the float64 reference
       (``gspn_ref.testing``: dtype-derived tolerances), all directions, chunk 0 and 3,
       float32/float16/bfloat16, odd shapes, H = 1, W = 1, groups, rows long enough for the wide
       (1024-thread) row-scan forwards;
    2. timings with CUDA events (median of many, warm) at (16, 8, 1024, 1024) and (1, 192, 56, 56),
       forward and backward, as a fraction of the device-to-device copy bandwidth measured in the
       same run, against the torch reference and against a baseline that launches one CUDA kernel
       per line (the original GSPN scheme, through CuPy);
    3. GSPN-T (224 x 224, random weights) in torch eager: reference scan vs the TVM CUDA kernels;
    4. the fused forward vs normalize + scan + gate/skip, the default vs the wide row forward around
       the switch length, and the adjoint launched around the 48 KiB shared-memory limit.
"""

from __future__ import annotations

import argparse
import ctypes
import json
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
LIBRARIES = ("scan", "fused")
CORRECTNESS_SHAPES = ((2, 4, 2, 9, 7), (1, 3, 3, 1, 13), (1, 2, 1, 11, 1), (2, 6, 3, 33, 65), (1, 2, 2, 300, 257))
#: Rows long enough for the wide row-scan forwards (forward only: their adjoints exceed shared memory).
WIDE_SHAPES = ((1, 2, 1, 6, 400), (1, 2, 2, 5, 1030), (1, 2, 2, 1030, 5))
#: Every (H, W) this check runs a forward at: the shapes above, the timed ones, GSPN-T's planes.
PLANES = sorted({(s[3], s[4]) for s in CORRECTNESS_SHAPES + WIDE_SHAPES} | {(s[2], s[3]) for s in TIMED_SHAPES}
                | {(n, n) for n in (56, 28, 14, 7, 256, 512, 1024)})  # fmt: skip
#: Square planes (16, 8, L, L) where every forward variant is timed.
VARIANT_PROBE_LENGTHS = (56, 256, 512, 1024)
#: Line lengths of the adjoint launched at (1, 8, L, L), G = 8, around the 48 KiB shared-memory limit.
SHARED_PROBE_LENGTHS = (512, 768, 800, 832, 1024)


# ----------------------------------------------------------------------------------- prepare (here)


def prepare(artifact: Path, python_version: str) -> None:
    sys.path.insert(0, str(ROOT))
    import tvm
    import tvm_ffi

    from gspn_tvm import build, compute
    from gspn_tvm.schedules import cuda as cuda_schedule
    from gspn_ref import DIRECTIONS

    artifact.mkdir(parents=True, exist_ok=True)
    for dtype in DTYPES:
        for library in LIBRARIES:
            build.compile_scan("cuda", dtype, library).export_library(str(artifact / f"{library}_cuda_{dtype}.so"))
            print(f"compiled {library}_cuda_{dtype}.so")
    lib = artifact / "lib"
    lib.mkdir(exist_ok=True)
    tvm_lib = Path(tvm.__file__).parent / "lib"
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(tvm_lib / name, lib / name)
    wheels = artifact / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    ffi_version = tvm_ffi.__version__
    # Wheels for the GPU machine's Python (hypothesis ships compiled wheels too), not this one's.
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
                "--python-version", python_version, "--platform", "manylinux_2_28_x86_64", "--platform",
                "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                "-d", str(wheels)]  # fmt: skip
    subprocess.run([*download, TVM_FFI_REQUIREMENT.format(version=ffi_version)], check=True)
    import hypothesis

    pure = [w.format(hypothesis=hypothesis.__version__) for w in PURE_WHEELS]
    subprocess.run([*download, *pure], check=True)
    manifest = {
        "target": build.cuda_target(),
        "tvm": tvm.__version__,
        "tvm_ffi": ffi_version,
        "dtypes": list(DTYPES),
        "forward": {d: compute.forward_name(d) for d in DIRECTIONS},
        "backward": {d: compute.backward_name(d) for d in DIRECTIONS},
        "fused": {d: compute.fused_forward_name(d) for d in DIRECTIONS},
        "threads": cuda_schedule.THREADS,
        # The forward the package runs (gspn_tvm.schedules.cuda.forward_symbol) for every plane
        # shape this check uses: "<library>|<direction>|<H>|<W>" -> symbol.
        "symbols": {f"{library}|{d}|{H}|{W}": cuda_schedule.forward_symbol(base(d), d, H, W)
                    for library, base in (("scan", compute.forward_name), ("fused", compute.fused_forward_name))
                    for d in DIRECTIONS for H, W in PLANES},  # fmt: skip
        "line_threads": list(cuda_schedule.LINE_THREADS),
        # Whether the package runs the compiled adjoint (else the reference) at the timed shapes
        # and at the lines of the shared-memory probe (G = C = 8).
        "backward_fits": {str(length): cuda_schedule.backward_fits(8, 8, length)
                          for length in sorted({*SHARED_PROBE_LENGTHS, *(s[2] for s in TIMED_SHAPES)})},
        "shared_limit_bytes": cuda_schedule.SHARED_LIMIT_BYTES,
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
    register_cuda_compiler(manifest["target"]["arch"])
    libraries = {(library, dtype): tvm_ffi.load_module(str(artifact / f"{library}_cuda_{dtype}.so"))
                 for library in LIBRARIES for dtype in manifest["dtypes"]}  # fmt: skip
    return libraries, manifest


def forward_symbol(manifest, library: str, direction: str, H: int, W: int) -> str:
    """The forward the package runs for planes (H, W) (``gspn_tvm.schedules.cuda.forward_symbol``,
    resolved at prepare time for every plane shape of this check)."""
    return manifest["symbols"][f"{library}|{direction}|{H}|{W}"]


def register_cuda_compiler(arch: str) -> None:
    """TVM's CUDA module from the pip build holds CUDA source (the build has no CUDA toolkit linked
    in), compiled when loaded through the ``tvm_callback_cuda_compile`` global that the full TVM's
    ``tvm.support.nvcc`` registers. The runtime alone has no such function: register one with nvcc."""
    import tempfile

    import tvm_ffi

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def compile_cuda(code, *_):
        with tempfile.TemporaryDirectory() as folder:
            source, fatbin = Path(folder) / "kernels.cu", Path(folder) / "kernels.fatbin"
            source.write_text(code)
            subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", str(fatbin), str(source)], check=True)
            return bytearray(fatbin.read_bytes())


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


def _check_cases(label: str, dtype_names, shapes, check) -> list[dict]:
    """``check(case, dtype, flag)`` (raises AssertionError on a mismatch) for every dtype, every
    ``(shape, flag)`` of ``shapes``, direction and chunk 0 and 3; one row per case."""
    import torch

    from gspn_ref import DIRECTIONS
    from gspn_ref.testing import ScanCase

    rows = []
    for dtype_name in dtype_names:
        for (B, C, G, H, W), flag in shapes:
            for direction in DIRECTIONS:
                for chunk in (0, 3):
                    try:
                        check(ScanCase(B, C, G, H, W, direction, chunk), getattr(torch, dtype_name), flag)
                        ok, error = True, ""
                    except AssertionError as mismatch:
                        ok, error = False, str(mismatch)
                    rows.append({"dtype": dtype_name, "shape": [B, C, G, H, W], "direction": direction,
                                 "chunk": chunk, "ok": ok, "error": error})
                    if not ok:
                        print(f"{label} MISMATCH", rows[-1])
    print(f"{label} correctness: {sum(r['ok'] for r in rows)}/{len(rows)} cases within tolerance")
    return rows


def check_correctness(libraries, manifest) -> list[dict]:
    """Every dtype, direction, chunk 0 and 3, odd shapes, H = 1, W = 1, groups: the compiled CUDA
    forward and adjoint against the float64 reference, with the comparison of the project's
    conformance suite (``gspn_ref.testing.check_scan_case``: dtype-derived tolerances); the rows
    long enough for the wide forwards without the adjoint (it exceeds shared memory there)."""
    import torch

    from gspn_ref.testing import check_scan_case

    forward = forward_kernel(libraries, manifest, "scan")

    def backward(gh, x, lam, gl, gm, gr, h, direction, chunk):
        grads = [torch.empty_like(t) for t in (x, lam, gl, gm, gr)]
        library = libraries[("scan", str(x.dtype).replace("torch.", ""))]
        library[manifest["backward"][direction]](gh, x, lam, gl, gm, gr, h, *grads, chunk)
        return grads

    def check(case, dtype, with_backward):
        check_scan_case(forward, case, dtype, backward=backward if with_backward else False, device="cuda")

    shapes = [(shape, True) for shape in CORRECTNESS_SHAPES] + [(shape, False) for shape in WIDE_SHAPES]
    return _check_cases("scan", manifest["dtypes"], shapes, check)


def _timed_or_nan(fn) -> float:
    """``cuda_median_ms(fn)``, or NaN with the error printed, so one failing kernel spares the rest."""
    try:
        return cuda_median_ms(fn)
    except Exception as error:  # reported, not fatal: the remaining timings still run
        print(f"TIMING FAILED: {str(error)[:600]!r}")
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
    library = libraries[("scan", "float32")]
    for B, C, H, W in TIMED_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x, lam = (torch.randn(B, C, H, W, device="cuda", generator=gen) for _ in range(2))
        gl, gm, gr = (torch.rand(B, C, H, W, device="cuda", generator=gen) / 3 for _ in range(3))
        gh = torch.randn_like(x)
        h = torch.empty_like(x)
        grads = [torch.empty_like(t) for t in (x, lam, gl, gm, gr)]
        for direction in ("t2b", "l2r"):
            forward = forward_symbol(manifest, "scan", direction, H, W)
            backward = manifest["backward"][direction]
            tvm_fwd = _timed_or_nan(lambda: library[forward](x, lam, gl, gm, gr, h, 0))
            length = W if direction in ("t2b", "b2t") else H
            # Where the adjoint does not fit in shared memory the package runs the reference.
            tvm_bwd = (_timed_or_nan(lambda: library[backward](gh, x, lam, gl, gm, gr, h, *grads, 0))
                       if manifest["backward_fits"][str(length)] else float("nan"))  # fmt: skip
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


def forward_kernel(libraries, manifest, library: str):
    """``fn(*inputs, direction, chunk) -> output`` with the compiled CUDA forward of ``library``
    (``"scan"``: ``x, lam, gl, gm, gr``; ``"fused"``: ``u, lam, al, am, ar, gate, skip``), picked as
    the package picks it (variant by line length, library by dtype, chunks of a line or more as 0)."""
    import torch

    from gspn_ref.directions import line_count

    def forward(*args):
        *tensors, direction, chunk = args
        inputs = [t.detach().contiguous() for t in tensors]
        out = torch.empty_like(inputs[0])
        H, W = out.shape[2], out.shape[3]
        chunk = 0 if chunk >= line_count(direction, H, W) else chunk
        symbol = forward_symbol(manifest, library, direction, H, W)
        libraries[(library, str(out.dtype).replace("torch.", ""))][symbol](*inputs, out, chunk)
        return out

    return forward


def check_fused_correctness(libraries, manifest) -> list[dict]:
    """The compiled CUDA fused forward against the float64 reference (``check_fused_case``), every
    dtype, direction, chunk 0 and 3, the shapes of :func:`check_correctness`."""
    from gspn_ref.testing import check_fused_case

    forward = forward_kernel(libraries, manifest, "fused")

    def check(case, dtype, _):
        check_fused_case(forward, case, dtype, backward=False, device="cuda")

    shapes = [(shape, False) for shape in CORRECTNESS_SHAPES + WIDE_SHAPES]
    return _check_cases("fused", manifest["dtypes"], shapes, check)


def time_fused_and_probes(libraries, manifest, bandwidth: float) -> list[dict]:
    """Fused forward vs normalize + scan + gate/skip (torch ops around the TVM scan); the default and
    the wide row-scan forward at the lengths around the switch; the adjoint at the lines around the
    shared-memory limit (does it launch?)."""
    import torch

    from gspn_ref import normalize_weights
    from gspn.bench.core import fused_scan_bytes, scan_bytes

    fused = forward_kernel(libraries, manifest, "fused")
    scan = libraries[("scan", "float32")]
    rows = []
    for B, C, H, W in TIMED_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        u, lam, al, am, ar, gate, skip = (torch.randn(B, C, H, W, device="cuda", generator=gen) for _ in range(7))
        for direction in ("t2b", "l2r"):
            def unfused():
                weights = normalize_weights(al, am, ar, direction)
                h = torch.empty_like(u)
                scan[forward_symbol(manifest, "scan", direction, H, W)](u, lam, *weights, h, 0)
                return h * gate + u * skip

            fused_ms = _timed_or_nan(lambda: fused(u, lam, al, am, ar, gate, skip, direction, 0))
            y = torch.empty_like(u)
            scheduled = libraries[("fused", "float32")][manifest["fused"][direction]]
            scheduled_ms = _timed_or_nan(lambda: scheduled(u, lam, al, am, ar, gate, skip, y, 0))
            unfused_ms = _timed_or_nan(unfused)
            moved = fused_scan_bytes(B, C, C, H, W, torch.float32)
            row = {"shape": [B, C, H, W], "direction": direction, "pass": "fused forward", "tvm_ms": fused_ms,
                   "symbol": forward_symbol(manifest, "fused", direction, H, W), "scheduled_256_threads_ms": scheduled_ms,
                   "unfused_ms": unfused_ms, "fraction_of_copy_bw": moved / (fused_ms * 1e-3) / bandwidth}  # fmt: skip
            rows.append(row)
            print(row)
        del u, lam, al, am, ar, gate, skip
    for length in VARIANT_PROBE_LENGTHS:
        B, C, H, W = 16, 8, length, length
        gen = torch.Generator(device="cuda").manual_seed(0)
        x, lam = (torch.randn(B, C, H, W, device="cuda", generator=gen) for _ in range(2))
        gl, gm, gr = (torch.rand(B, C, H, W, device="cuda", generator=gen) / 3 for _ in range(3))
        h = torch.empty_like(x)
        moved = scan_bytes(B, C, C, H, W, torch.float32)
        for direction in ("t2b", "l2r"):
            base = manifest["forward"][direction]
            variants = [("scheduled, 256 threads", base)]
            variants += [(f"line pipeline, {threads} threads", f"{base}_lines{threads}")
                         for threads in manifest["line_threads"] if length <= threads]  # fmt: skip
            if direction == "t2b":
                variants.append(("scheduled, wide", f"{base}_wide"))
            for variant, symbol in variants:
                ms = _timed_or_nan(lambda: scan[symbol](x, lam, gl, gm, gr, h, 0))
                row = {"shape": [B, C, H, W], "direction": direction, "pass": f"forward, {variant}",
                       "runs_in_package": symbol == forward_symbol(manifest, "scan", direction, H, W), "tvm_ms": ms,
                       "fraction_of_copy_bw": moved / (ms * 1e-3) / bandwidth}  # fmt: skip
                rows.append(row)
                print(row)
        del x, lam, gl, gm, gr, h
    for length in SHARED_PROBE_LENGTHS:
        x, lam, gl, gm, gr, gh, h = (torch.rand(1, 8, length, length, device="cuda") for _ in range(7))
        grads = [torch.empty_like(t) for t in (x, lam, gl, gm, gr)]
        try:
            scan[manifest["backward"]["t2b"]](gh, x, lam, gl, gm, gr, h, *grads, 0)
            torch.cuda.synchronize()
            launched, error = True, ""
        except RuntimeError as failure:  # the launch error TVM raises, kept as the probe's answer
            launched, error = False, str(failure)[:120]
        row = {"shape": [1, 8, length, length], "direction": "t2b", "pass": "backward launch probe",
               "launched": launched, "package_runs_kernel": manifest["backward_fits"][str(length)], "error": error}
        rows.append(row)
        print(row)
    return rows


def register_torch_kernels(libraries, manifest) -> None:
    """The compiled kernels as the CUDA kernels of ``gspn::scan`` and ``gspn::fused_scan`` (what
    ``gspn_tvm.enable()`` does with the full TVM; here with the runtime alone)."""
    from gspn_ref.ops import fused_scan_op, scan_op

    scan_op.register_kernel("cuda")(forward_kernel(libraries, manifest, "scan"))
    fused_scan_op.register_kernel("cuda")(forward_kernel(libraries, manifest, "fused"))


def time_gspn_tiny(libraries, manifest) -> list[dict]:
    """GSPN-T (random weights, 224 x 224, float32, inference) in torch eager on the GPU: the
    reference scan vs the TVM CUDA kernels, batch 1 and 8; outputs compared."""
    import torch

    from gspn_ref.models import gspn_tiny

    torch.manual_seed(0)
    net = gspn_tiny(num_classes=1000).eval().cuda()
    rows, reference = [], {}
    images = {batch: torch.randn(batch, 3, 224, 224, device="cuda") for batch in (1, 8)}
    with torch.inference_mode():
        for batch, x in images.items():
            reference[batch] = (net(x), cuda_median_ms(lambda: net(x), repeat=5, warmup=1))
        register_torch_kernels(libraries, manifest)
        for batch, x in images.items():
            out = net(x)
            ms = cuda_median_ms(lambda: net(x), repeat=20, warmup=3)
            expected, reference_ms = reference[batch]
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            rows.append({"model": "GSPN-T", "batch": batch, "reference_ms": reference_ms, "tvm_ms": ms,
                         "speedup": reference_ms / ms, "max_rel_difference": error})
            print(rows[-1])
    return rows


def run(artifact: Path, json_path: str | None) -> int:
    sys.path[:0] = [str(ROOT)]
    libraries, manifest = load_libraries(artifact)
    correctness = check_correctness(libraries, manifest)
    fused_correctness = check_fused_correctness(libraries, manifest)
    report = {"manifest": manifest, "correctness": correctness, "fused_correctness": fused_correctness}

    def save():
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=2))

    save()
    report["timings"] = time_kernels(libraries, manifest)
    save()
    try:
        report["gspn_tiny"] = time_gspn_tiny(libraries, manifest)
    except KeyError as missing:  # a plane shape the manifest does not resolve: say which
        report["gspn_tiny"] = [{"error": f"no resolved forward for {missing}"}]
        print(report["gspn_tiny"])
    save()
    report["timings"]["rows"] += time_fused_and_probes(libraries, manifest, report["timings"]["copy_bytes_per_s"])
    save()
    return 0 if all(row["ok"] for row in correctness + fused_correctness) else 1


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
