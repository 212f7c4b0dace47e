"""C++ unit tests of the ONNX Runtime operators' kernels, independent of ONNX Runtime.

Compiles ``export/ortops/tests/test_kernel.cc`` with the kernel source and runs it: the scan and
the fused scan (weights normalized from logits, gate and skip) against naive double-precision loops,
scratch bounds, and planes at element offsets beyond 2**31. Built
three times: with the instruction-set flags the library is built with (AVX2/F16C paths where the
CPU has them), the same with sanitizers (out-of-bounds accesses of the vector paths: masked edge
tiles, padded lines, prefetch distances), and for the x86-64 baseline with sanitizers (scalar
paths, out-of-bounds and undefined behaviour caught).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from export import build

SOURCE_DIR = Path(build.__file__).resolve().parent / "ortops"
TEST_SOURCE = SOURCE_DIR / "tests" / "test_kernel.cc"
KERNEL_SOURCE = SOURCE_DIR / "gspn_scan_kernel.cc"


def library_arch_flags() -> list[str]:
    """The -march flags export.build compiles the library with (for this compiler)."""
    return list(build.arch_flags(compiler()))


def compiler() -> str:
    name = os.environ.get("CXX", "g++")
    if shutil.which(name) is None:
        pytest.fail(f"C++ compiler {name!r} not found: the project needs a C++17 compiler (set CXX)")
    return name


def build_and_run(tmp_path: Path, flags: list[str]) -> subprocess.CompletedProcess:
    binary = tmp_path / "test_kernel"
    command = [compiler(), "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", *flags,
               f"-I{SOURCE_DIR}", str(TEST_SOURCE), str(KERNEL_SOURCE), "-o", str(binary)]  # fmt: skip
    compiled = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, " ".join(command) + "\n" + compiled.stderr[-4000:]
    return subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)


def require_sanitizers(tmp_path: Path) -> None:
    """The sanitizer runtimes ship with GCC (libasan, libubsan) and clang; without them this test
    would check nothing, so their absence is a failure that says so."""
    probe = tmp_path / "probe.cc"
    probe.write_text("int main() { return 0; }\n")
    result = subprocess.run([compiler(), "-fsanitize=address,undefined", str(probe), "-o", str(tmp_path / "probe")],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"{compiler()} cannot build with -fsanitize=address,undefined (install its sanitizer "
                    f"runtimes, e.g. libasan/libubsan):\n{result.stderr[-2000:]}")


def test_kernel_with_library_flags(tmp_path):
    result = build_and_run(tmp_path, library_arch_flags())
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr[-4000:]}"
    assert "all kernel checks passed" in result.stdout


def sanitizer_flags(tmp_path: Path) -> list[str]:
    require_sanitizers(tmp_path)
    return ["-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def test_kernel_with_library_flags_and_sanitizers(tmp_path):
    result = build_and_run(tmp_path, library_arch_flags() + sanitizer_flags(tmp_path))
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr[-4000:]}"
    assert "all kernel checks passed" in result.stdout


def test_kernel_baseline_with_sanitizers(tmp_path):
    result = build_and_run(tmp_path, sanitizer_flags(tmp_path))
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr[-4000:]}"
    assert "all kernel checks passed" in result.stdout


def assembly_of(tmp_path: Path, flags: list[str]) -> str:
    """The kernel source compiled to assembly the way export.build compiles the library."""
    output = tmp_path / "kernel.s"
    command = [compiler(), "-std=c++17", "-O3", *flags, "-fPIC", "-fvisibility=hidden", f"-I{SOURCE_DIR}",
               "-S", str(KERNEL_SOURCE), "-o", str(output)]  # fmt: skip
    compiled = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, " ".join(command) + "\n" + compiled.stderr[-4000:]
    return output.read_text()


def function_body(assembly: str, name_part: str) -> str:
    """The instructions of the first function whose symbol contains ``name_part``."""
    lines = assembly.splitlines()
    start = next(i for i, line in enumerate(lines) if name_part in line and line.endswith(":") and not line.startswith("."))
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == ".cfi_endproc")
    return "\n".join(lines[start:end])


def test_column_transposes_keep_their_prefetches(tmp_path):
    """GCC counts ``__builtin_prefetch`` as no side effect: its IPA analysis found the helpers that
    only prefetch ``const`` and deleted every call to them (no prefetch instruction was left in the
    library until this was noticed). The strip transposes of the AVX2 path must still prefetch."""
    assembly = assembly_of(tmp_path, ["-march=x86-64-v3"])
    body = function_body(assembly, "TransposeToLines")
    prefetches = body.count("prefetch")
    print(f"TransposeToLines: {len(body.splitlines())} lines of assembly, {prefetches} prefetch instructions")
    assert prefetches > 0
