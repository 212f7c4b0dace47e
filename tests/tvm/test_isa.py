"""The CPU target comes from the features the OS reports, never from the CPU's model name.

``gspn_tvm.isa`` decides the x86-64 level for the TVM kernels, Relax builds and the ONNX Runtime
library. The flag sets below are what Linux prints in ``/proc/cpuinfo`` on real machines (an AVX2
cloud VM whose model name is a Zen 4 EPYC, an AVX-512 server, an old QEMU default CPU). The setup
section checks that the ONNX Runtime library build uses the same level and fails with one clear
message where a compiler or the Debian package index is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gspn_tvm import build, isa

REPO_ROOT = Path(__file__).resolve().parents[2]

# An AMD EPYC VM (model name implies Zen 4, AVX-512) whose hypervisor exposes AVX2, FMA, F16C only.
AVX2_VM_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid extd_apicid pni pclmulqdq "
    "ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy "
    "abm sse4a misalignsse 3dnowprefetch bmi1 avx2 bmi2 erms rdseed adx clflushopt sha_ni xsaveopt xsavec"
)
AVX512_SERVER_FLAGS = AVX2_VM_FLAGS + " avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512_bf16"
QEMU64_FLAGS = "fpu de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 syscall nx lm pni cx16 hypervisor"

# LLVM's names of the instruction-set features (not tuning flags) as Linux spells them.
LLVM_TO_LINUX = {
    "sse3": "pni", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "sahf": "lahf_lm", "lzcnt": "abm", "bmi": "bmi1",
    "x87": "fpu", "pclmul": "pclmulqdq", "rdrnd": "rdrand", "sha": "sha_ni", "avx512bf16": "avx512_bf16",
    "avx512vnni": "avx512_vnni", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
}  # fmt: skip
ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "lzcnt", "popcnt", "movbe", "cx16", "sahf", "xsave",
                "x87", "mmx", "cmov", "cx8", "fxsr", "aes", "pclmul", "sha", "adx", "rdrnd", "rdseed")  # fmt: skip


def fake_cpuinfo(tmp_path: Path, flags: str, model: str = "AMD EPYC 9654 96-Core Processor") -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: {model}\nflags\t\t: {flags}\n\n")
    return path


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """``machine(flags)`` makes this process see an x86-64 Linux machine reporting ``flags``."""

    def use(flags: str, model: str = "AMD EPYC 9654 96-Core Processor") -> None:
        monkeypatch.setattr(isa, "CPUINFO", fake_cpuinfo(tmp_path, flags, model))
        monkeypatch.setattr(isa, "is_x86_64", lambda: True)

    monkeypatch.delenv(isa.ENV_VAR, raising=False)
    return use


def llvm_isa_features(target: dict) -> set[str]:
    """The instruction-set features LLVM enables for ``target``, spelled as Linux spells them."""
    import tvm
    from tvm.target import codegen

    features = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(target))}
    isa_features = {f for f in features if f.startswith(ISA_PREFIXES)}
    return {LLVM_TO_LINUX.get(f, f.replace(".", "_")) for f in isa_features}


def test_resolved_target_uses_only_features_this_machine_reports(monkeypatch):
    monkeypatch.delenv(isa.ENV_VAR, raising=False)
    reported = isa.reported_features()
    assert reported, "this test runs on Linux x86-64, which reports /proc/cpuinfo flags"
    target = build.cpu_target()
    assert isa.required_features(target["mcpu"]) <= reported
    # LLVM's own idea of the level (an independent table) also stays within what the machine reports.
    beyond = llvm_isa_features(target) - reported
    assert not beyond, f"LLVM would use {sorted(beyond)}, which this machine does not report"


@pytest.mark.parametrize(
    ("flags", "level"),
    [
        (AVX2_VM_FLAGS, "x86-64-v3"),
        (AVX512_SERVER_FLAGS, "x86-64-v4"),
        (AVX512_SERVER_FLAGS.replace(" avx512vl", ""), "x86-64-v3"),  # one AVX-512 subset missing
        (AVX2_VM_FLAGS.replace(" movbe", ""), "x86-64-v2"),
        (AVX2_VM_FLAGS.replace(" abm", ""), "x86-64-v2"),  # no LZCNT
        (QEMU64_FLAGS, "x86-64"),  # no SSSE3/SSE4/POPCNT
    ],
)
def test_level_is_the_highest_one_all_of_whose_features_are_reported(machine, flags, level):
    machine(flags)
    assert isa.resolve_level() == level
    assert build.cpu_target() == {"kind": "llvm", "mcpu": level}
    assert isa.gcc_march_flags() == [f"-march={level}"]


def test_a_model_name_that_implies_more_than_the_machine_exposes_is_never_used(machine, monkeypatch):
    """The issue's VM: LLVM calls its CPU ``znver4`` (AVX-512) but only AVX2 is exposed."""
    import tvm

    machine(AVX2_VM_FLAGS, model="AMD EPYC 9R14 (Zen 4, znver4)")

    def model_name_lookup():
        raise AssertionError("the CPU model name was consulted")

    monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", model_name_lookup)
    target = build.cpu_target()
    assert target == {"kind": "llvm", "mcpu": "x86-64-v3"}
    assert not {f for f in llvm_isa_features(target) if f.startswith("avx512")}
    assert "x86-64-v3" in json_of(build.entry_record("cpu", "float32")["target"])
    sources = [*REPO_ROOT.glob("gspn_tvm/**/*.py"), *REPO_ROOT.glob("export/**/*.py"), *REPO_ROOT.glob("gspn/**/*.py")]
    assert sources and not [p for p in sources if "llvm_get_system_cpu" in p.read_text()]


def json_of(value) -> str:
    import json

    return json.dumps(value)


@pytest.mark.parametrize("name", ["znver4", "native", "skylake-avx512", "x86-64-v5", "X86-64-V3", "haswell"])
def test_override_refuses_anything_but_a_level(machine, monkeypatch, name):
    machine(AVX512_SERVER_FLAGS)
    monkeypatch.setenv(isa.ENV_VAR, name)
    message = rf"GSPN_CPU_TARGET: expected one of x86-64, x86-64-v2, x86-64-v3, x86-64-v4; got '{re.escape(name)}'"
    with pytest.raises(ValueError, match=message):
        build.cpu_target()


def test_override_picks_a_lower_level(machine, monkeypatch):
    machine(AVX512_SERVER_FLAGS)
    monkeypatch.setenv(isa.ENV_VAR, "x86-64-v2")
    assert build.cpu_target() == {"kind": "llvm", "mcpu": "x86-64-v2"}
    assert isa.gcc_march_flags() == ["-march=x86-64-v2"]


def test_override_above_the_machine_is_refused(machine, monkeypatch):
    machine(AVX2_VM_FLAGS)
    monkeypatch.setenv(isa.ENV_VAR, "x86-64-v4")
    with pytest.raises(ValueError, match=r"GSPN_CPU_TARGET=x86-64-v4: this machine does not report avx512bw, avx512cd, "
                                         r"avx512dq, avx512f, avx512vl \(its highest level is x86-64-v3\)"):  # fmt: skip
        build.cpu_target()


def test_unreported_features_mean_the_v2_baseline(monkeypatch, tmp_path):
    monkeypatch.setattr(isa, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(isa, "is_x86_64", lambda: True)
    monkeypatch.delenv(isa.ENV_VAR, raising=False)
    assert isa.resolve_level() == "x86-64-v2"
    assert isa.missing_features(isa.LEVEL_FEATURES["x86-64-v2"]) == []
    assert isa.missing_features(isa.LEVEL_FEATURES["x86-64-v3"]) == sorted(isa.LEVEL_FEATURES["x86-64-v3"] - isa.LEVEL_FEATURES["x86-64-v2"])


def test_other_architectures_get_no_mcpu_and_refuse_levels(monkeypatch):
    monkeypatch.setattr(isa, "is_x86_64", lambda: False)
    monkeypatch.delenv(isa.ENV_VAR, raising=False)
    assert build.cpu_target() == {"kind": "llvm"} and isa.gcc_march_flags() == []
    monkeypatch.setenv(isa.ENV_VAR, "x86-64-v2")
    with pytest.raises(ValueError, match=r"GSPN_CPU_TARGET=x86-64-v2: the x86-64 levels apply to x86-64 CPUs"):
        build.cpu_target()


def test_missing_features_names_what_the_machine_lacks(machine):
    machine(AVX2_VM_FLAGS)
    assert isa.missing_features(isa.LEVEL_FEATURES["x86-64-v4"]) == ["avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"]
    assert isa.missing_features(isa.LEVEL_FEATURES["x86-64-v3"]) == []


def test_isa_imports_nothing_but_the_standard_library():
    code = "import sys, gspn_tvm.isa; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tvm', 'numpy', 'gspn_ref')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


BASELINE_SCRIPT = textwrap.dedent(
    """
    import torch
    import gspn_ref
    from gspn_tvm import build, kernels
    from tests.helpers import assert_close_scaled, make_scan_inputs

    for direction, chunk in (("t2b", 0), ("l2r", 2), ("r2l", 0)):
        x, lam, gl, gm, gr = make_scan_inputs(2, 4, 2, 7, 6, torch.float32, seed=5, direction=direction)
        h = kernels.scan_forward(x, lam, gl, gm, gr, direction, chunk)
        expected = gspn_ref.gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)
        assert_close_scaled(h, expected, torch.float32, 7, f"h {direction}")
        gh = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
        grads = kernels.scan_backward(gh, x, lam, gl, gm, gr, expected, direction, chunk)
        want = gspn_ref.gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, expected, direction, chunk)
        for name, got, ref in zip(("dx", "dlam", "dgl", "dgm", "dgr"), grads, want):
            assert_close_scaled(got, ref, torch.float32, 7 * 2, f"{name} {direction}")
    print(build.cache_path("cpu", "float32"))
    """
)


def test_baseline_kernels_run_and_match_the_reference(tmp_path):
    """Kernels forced to x86-64-v2 (a machine without AVX) compile, contain no AVX code, and are right."""
    env = {**os.environ, isa.ENV_VAR: "x86-64-v2", "GSPN_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=420)  # fmt: skip
    assert result.returncode >= 0, f"killed by {signal.Signals(-result.returncode).name}"
    assert result.returncode == 0, result.stderr[-3000:]
    library = Path(result.stdout.strip().splitlines()[-1])
    assert library.is_file() and str(tmp_path) in str(library)
    assert '"mcpu": "x86-64-v2"' in build.checksum_path(library).read_text()
    disassembly = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "xmm" in disassembly, "expected SSE code in the library"
    avx = [line for line in disassembly.splitlines() if re.search(r"%[yz]mm\d|\tv[a-z]+\s", line)]
    assert avx == [], f"AVX instructions in an x86-64-v2 library: {avx[:3]}"


# -- setup: the ONNX Runtime library build ---------------------------------------------------------


def test_ort_library_build_uses_the_same_level(machine, monkeypatch):
    from export import build as ort_build

    assert not hasattr(ort_build, "_cpu_flags"), "export/build.py must not parse cpuinfo itself"
    machine(AVX2_VM_FLAGS)
    command = ort_build._command("g++", Path("/include"), Path("/out.so"))
    assert "-march=x86-64-v3" in command and not [c for c in command if c in ("-march=native", "-mavx512f")]
    monkeypatch.setenv(isa.ENV_VAR, "x86-64-v2")
    assert "-march=x86-64-v2" in ort_build._command("g++", Path("/include"), Path("/out.so"))
    monkeypatch.setenv(isa.ENV_VAR, "znver4")
    with pytest.raises(ort_build.BuildError, match=r"GSPN_CPU_TARGET: expected one of"):
        ort_build._command("g++", Path("/include"), Path("/out.so"))


def _run_ort_build(env_changes: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_changes}
    return subprocess.run([sys.executable, "-m", "export.build"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_missing_compiler_fails_with_one_clear_message():
    result = _run_ort_build({"CXX": "no-such-compiler-g++"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: C++ compiler 'no-such-compiler-g++' not found."), result.stderr
    assert "needs a C++17 compiler" in lines[0] and "set ORT_INCLUDE_DIR to the include/ folder of an ONNX Runtime release" in lines[0]


def test_compiler_without_cxx17_fails_with_one_clear_message(tmp_path):
    old_compiler = tmp_path / "old-g++"
    old_compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-std=c++17" ] && { echo "unrecognized: -std=c++17" >&2; exit 1; }; done\nexit 0\n')
    old_compiler.chmod(0o755)
    result = _run_ort_build({"CXX": str(old_compiler)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not compile C++17" in lines[0] and "ORT_INCLUDE_DIR" in lines[0], result.stderr


def _script_copy(tmp_path: Path) -> Path:
    """The header script in an empty checkout (no build/ yet), so that it has to fetch."""
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    script = tmp_path / "repo" / "scripts" / "fetch_ort_headers.sh"
    shutil.copy(REPO_ROOT / "scripts" / "fetch_ort_headers.sh", script)
    return script


def _tools(tmp_path: Path, fakes: dict[str, str]) -> Path:
    """A PATH folder with the ordinary tools the script uses, plus ``fakes`` (name -> shell body)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "dirname", "find", "cat", "awk", "head", "mkdir", "id", "ls", "rm", "env"):
        found = shutil.which(tool)
        assert found, f"{tool} is needed by the header script"
        (folder / tool).symlink_to(found)
    for name, body in fakes.items():
        (folder / name).write_text("#!/bin/sh\n" + body + "\n")
        (folder / name).chmod(0o755)
    return folder


def _run_script(script: Path, path: Path, extra_env: dict) -> subprocess.CompletedProcess:
    env = {"PATH": str(path), "HOME": str(script.parent), **extra_env}
    return subprocess.run([str(path / "bash"), str(script)], env=env, capture_output=True, text=True, timeout=60)


def _assert_one_clear_message(result: subprocess.CompletedProcess, reason: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error", "E:", "W:"))]
    assert errors == [errors[0]] and errors[0].startswith("error: cannot fetch the ONNX Runtime headers: " + reason), result.stderr
    assert "export ORT_INCLUDE_DIR=/path/to/onnxruntime-linux-x64-<version>/include" in result.stderr
    assert "This step needs apt-get and dpkg and access to a Debian package index" in result.stderr


def test_header_script_without_apt_get_fails_with_one_clear_message(tmp_path):
    script = _script_copy(tmp_path)
    result = _run_script(script, _tools(tmp_path, {}), {})
    _assert_one_clear_message(result, "apt-get is not installed")


def test_header_script_without_the_debian_index_fails_with_one_clear_message(tmp_path):
    script = _script_copy(tmp_path)
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    fakes = {
        "apt-get": 'case " $* " in *" update "*) echo "E: Failed to fetch http://mirror.invalid/debian trixie InRelease"; exit 100;; esac; exit 0',
        "dpkg": 'echo amd64',
    }
    env = {"DEBIAN_MIRROR": "http://mirror.invalid/debian", "DEBIAN_KEYRING": str(keyring)}
    result = _run_script(script, _tools(tmp_path, fakes), env)
    _assert_one_clear_message(result, "the Debian package index at http://mirror.invalid/debian (trixie) could not be read")
    log = tmp_path / "repo" / "build" / "apt-trixie" / "apt.log"
    assert "E: Failed to fetch" in log.read_text() and str(log) in result.stderr
