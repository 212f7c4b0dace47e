"""The on-disk kernel cache of ``gspn_tvm.build`` against damaged, foreign and unwritable entries.

Nothing here compiles more than the one float32 CPU library of the default cache: every "compile"
in these tests is a stand-in that copies that library, and counts itself. Cases where a damaged
file could reach the dynamic loader (and kill the process with SIGBUS or SIGSEGV) run in a
subprocess with its own ``GSPN_CACHE_DIR``; the test fails on any signal. Each checks the outcome
the cache promises: the scan runs and matches the reference, the damaged entry is replaced by a
verified one (or, where the cache cannot be written, left alone), with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gspn_ref
from gspn_tvm import build, isa
from tests.helpers import assert_close_scaled, make_scan_inputs

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICE, DTYPE = "cpu", "float32"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared_dir():
    """A folder every subprocess can use, the unprivileged ones included (tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="gspn-cache-test-"))
    folder.chmod(0o777)
    yield folder
    for path in folder.rglob("*"):  # read-only folders left by a test
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def good_library(shared_dir) -> Path:
    """A copy of the real float32 CPU scan library (compiled into the default cache if not there yet)."""
    build.load_scan_library(DEVICE, DTYPE)
    source = build.cache_path(DEVICE, DTYPE)
    copy = shared_dir / "good.so"
    shutil.copyfile(source, copy)
    copy.chmod(0o644)
    return copy


@pytest.fixture(scope="module")
def scan_inputs(shared_dir) -> Path:
    path = shared_dir / "inputs.npz"
    x, lam, gl, gm, gr = make_scan_inputs(1, 4, 2, 5, 6, torch.float32, seed=3)
    np.savez(path, x=x.numpy(), lam=lam.numpy(), gl=gl.numpy(), gm=gm.numpy(), gr=gr.numpy())
    path.chmod(0o644)
    return path


def assert_scan_matches_reference(h: np.ndarray | torch.Tensor, inputs: Path) -> None:
    arrays = np.load(inputs)
    x, lam, gl, gm, gr = (torch.from_numpy(arrays[k]) for k in ("x", "lam", "gl", "gm", "gr"))
    expected = gspn_ref.gspn_scan_ref(x, lam, gl, gm, gr, "t2b", 0)
    h = torch.as_tensor(h)
    assert_close_scaled(h, expected, torch.float32, x.shape[2], "h from the cached library")


def entry_in(cache_dir: Path, monkeypatch=None) -> Path:
    """The cache entry for float32 CPU kernels under ``cache_dir`` (as a process with that cache resolves it)."""
    previous = os.environ.get("GSPN_CACHE_DIR")
    os.environ["GSPN_CACHE_DIR"] = str(cache_dir)
    try:
        return build.cache_path(DEVICE, DTYPE)
    finally:
        if previous is None:
            del os.environ["GSPN_CACHE_DIR"]
        else:
            os.environ["GSPN_CACHE_DIR"] = previous


def install_entry(path: Path, library: Path, record: dict | None = None) -> None:
    """Put ``library`` at the entry ``path`` with a checksum file of its real sha256 (``record`` overrides fields)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(library, path)
    content = {**build.entry_record(DEVICE, DTYPE), "sha256": sha256(library), **(record or {})}
    build.checksum_path(path).write_text(json.dumps(content))


def assert_entry_verified(path: Path, library: Path) -> None:
    """The entry holds the good library and a checksum file recording its sha256."""
    assert sha256(path) == sha256(library), "the entry does not hold a complete library"
    record = json.loads(build.checksum_path(path).read_text())
    assert record["sha256"] == sha256(path) and record["dtype"] == DTYPE and record["device"] == DEVICE


# -- in this process: cases that cannot reach the dynamic loader with a damaged file -----------------


class _CopyOfCompiled:
    """Stands in for a fresh compile: exports a copy of an already compiled library."""

    def __init__(self, source: Path):
        self.source = source

    def export_library(self, path):
        shutil.copyfile(self.source, path)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch, good_library):
    """``GSPN_CACHE_DIR`` in tmp; returns the list of (stand-in) compiles."""
    monkeypatch.setenv("GSPN_CACHE_DIR", str(tmp_path / "cache"))
    compiles = []
    monkeypatch.setattr(build, "compile_scan", lambda *key: compiles.append(key) or _CopyOfCompiled(good_library))
    return compiles


def run_scan(library, inputs: Path) -> torch.Tensor:
    arrays = np.load(inputs)
    x, lam, gl, gm, gr = (torch.from_numpy(arrays[k]) for k in ("x", "lam", "gl", "gm", "gr"))
    h = torch.empty_like(x)
    library["gspn_scan_forward_t2b"](x, lam, gl, gm, gr, h, 0)
    return h


def test_cache_hit_loads_without_compiling(isolated_cache, good_library):
    build.load_scan_library(DEVICE, DTYPE)
    build.load_scan_library(DEVICE, DTYPE)
    assert isolated_cache == [(DEVICE, DTYPE)]
    path = build.cache_path(DEVICE, DTYPE)
    assert path.name == "float32.so" and build.kernel_hash(DEVICE) in str(path)
    assert_entry_verified(path, good_library)


def test_stale_kernel_version_is_not_loaded(isolated_cache, monkeypatch):
    old = build.cache_path(DEVICE, DTYPE)
    build.load_scan_library(DEVICE, DTYPE)
    monkeypatch.setattr(build, "kernel_hash", lambda device: "edited-schedule")
    assert build.cache_path(DEVICE, DTYPE) != old
    build.load_scan_library(DEVICE, DTYPE)
    assert len(isolated_cache) == 2


def test_cache_key_includes_the_resolved_target(isolated_cache, monkeypatch):
    """Machines of different levels sharing one cache folder get different entries."""
    paths = {}
    for level in ("x86-64-v3", "x86-64-v4"):
        monkeypatch.setattr(isa, "reported_features", lambda cpuinfo=None, level=level: isa.LEVEL_FEATURES[level])
        monkeypatch.setattr(isa, "is_x86_64", lambda: True)
        monkeypatch.delenv(isa.ENV_VAR, raising=False)
        paths[level] = build.cache_path(DEVICE, DTYPE)
        assert build.entry_record(DEVICE, DTYPE)["target"] == {"kind": "llvm", "mcpu": level}
    monkeypatch.setenv(isa.ENV_VAR, "x86-64-v2")
    paths["forced x86-64-v2"] = build.cache_path(DEVICE, DTYPE)
    assert len({p.parent for p in paths.values()}) == 3, paths


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"dtype": "float16"}, "built for dtype='float16', not 'float32'"),
        ({"target": {"kind": "llvm", "mcpu": "znver4"}}, "built for target="),
        ({"kernel": "0123456789abcdef"}, "built for kernel='0123456789abcdef'"),
    ],
)
def test_entry_recorded_for_another_build_is_rebuilt(isolated_cache, good_library, scan_inputs, caplog, record, reason):
    path = build.cache_path(DEVICE, DTYPE)
    install_entry(path, good_library, record)
    with caplog.at_level(logging.WARNING, logger="gspn_tvm.build"):
        library = build.load_scan_library(DEVICE, DTYPE)
    assert isolated_cache == [(DEVICE, DTYPE)]
    assert f"cache entry {path} is unusable ({reason}" in caplog.text
    assert_scan_matches_reference(run_scan(library, scan_inputs), scan_inputs)
    assert_entry_verified(path, good_library)


def test_entry_without_checksum_is_rebuilt(isolated_cache, good_library, caplog):
    path = build.cache_path(DEVICE, DTYPE)
    path.parent.mkdir(parents=True)
    shutil.copyfile(good_library, path)  # as left by a version of the cache without checksums
    with caplog.at_level(logging.WARNING, logger="gspn_tvm.build"):
        build.load_scan_library(DEVICE, DTYPE)
    assert isolated_cache == [(DEVICE, DTYPE)]
    assert "is unusable (no checksum file beside it); rebuilding it" in caplog.text
    assert_entry_verified(path, good_library)


def test_directory_at_the_entry_path_is_left_alone(isolated_cache, scan_inputs, caplog):
    path = build.cache_path(DEVICE, DTYPE)
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("someone else's")
    with caplog.at_level(logging.WARNING, logger="gspn_tvm.build"):
        library = build.load_scan_library(DEVICE, DTYPE)
    assert_scan_matches_reference(run_scan(library, scan_inputs), scan_inputs)
    assert (path / "keep.txt").read_text() == "someone else's"
    assert "float32.so is not a regular file" in caplog.text
    assert "cannot write the kernel cache at" in caplog.text and "without caching them" in caplog.text
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".float32-")] == [], "temporary files left behind"


def test_cache_location_that_is_a_file_is_used_from_memory(isolated_cache, tmp_path, monkeypatch, scan_inputs, caplog):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("not a folder")
    monkeypatch.setenv("GSPN_CACHE_DIR", str(not_a_folder))
    with caplog.at_level(logging.WARNING, logger="gspn_tvm.build"):
        library = build.load_scan_library(DEVICE, DTYPE)
    assert_scan_matches_reference(run_scan(library, scan_inputs), scan_inputs)
    assert not_a_folder.read_text() == "not a folder"
    assert caplog.text.count("cannot write the kernel cache") == 1


def test_unknown_dtype_and_device_are_refused(isolated_cache):
    with pytest.raises(ValueError, match=r"dtype: expected one of \('float32', 'float16', 'bfloat16'\); got 'float64'"):
        build.load_scan_library(DEVICE, "float64")
    with pytest.raises(ValueError, match=r"device: expected one of \('cpu', 'cuda'\); got 'tpu'"):
        build.load_scan_library("tpu", DTYPE)


# -- in a subprocess: damaged files that could kill the process, unwritable caches, concurrent writers --

CACHE_SCRIPT = textwrap.dedent(
    """
    import logging, os, shutil, sys, time
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import numpy as np
    import tvm
    from gspn_tvm import build

    class CopyOfCompiled:
        def export_library(self, path):
            shutil.copyfile(os.environ["GOOD_LIBRARY"], path)

    def stand_in_compile(device, dtype):
        with open(os.environ["COMPILE_LOG"], "a") as log:
            log.write(f"{device} {dtype}\\n")
        time.sleep(float(os.environ.get("COMPILE_SECONDS", "0")))
        return CopyOfCompiled()

    build.compile_scan = stand_in_compile
    library = build.load_scan_library("cpu", "float32")
    arrays = np.load(os.environ["SCAN_INPUTS"])
    args = [tvm.runtime.tensor(arrays[k]) for k in ("x", "lam", "gl", "gm", "gr")]
    h = tvm.runtime.tensor(np.zeros_like(arrays["x"]))
    library["gspn_scan_forward_t2b"](*args, h, 0)
    np.save(os.environ["SCAN_OUTPUT"], h.numpy())
    print("scan done")
    """
)


def cache_process(cache_dir: Path, good_library: Path, scan_inputs: Path, name: str, *, read_only: bool = False,
                  compile_seconds: float = 0.0) -> tuple[subprocess.Popen, Path, Path]:  # fmt: skip
    """Start CACHE_SCRIPT with ``GSPN_CACHE_DIR=cache_dir``; returns (process, compile log, output)."""
    work = good_library.parent
    log, output = work / f"{name}.compiles", work / f"{name}.npy"
    env = {
        **os.environ, "GSPN_CACHE_DIR": str(cache_dir), "GOOD_LIBRARY": str(good_library),
        "COMPILE_LOG": str(log), "SCAN_INPUTS": str(scan_inputs), "SCAN_OUTPUT": str(output),
        "COMPILE_SECONDS": str(compile_seconds), "PYTHONDONTWRITEBYTECODE": "1",
    }  # fmt: skip
    prefix = []
    if read_only and os.geteuid() == 0:
        # root ignores permission bits; without these capabilities it obeys them like any user
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to run the read-only case as root"
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner,-linux_immutable"]
    process = subprocess.Popen(
        [*prefix, sys.executable, "-c", CACHE_SCRIPT], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return process, log, output


def finish(process: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode >= 0, f"killed by {signal.Signals(-process.returncode).name}: {stderr[-2000:]}"
    assert process.returncode == 0 and "scan done" in stdout, stderr[-3000:]
    return stdout, stderr


def compiles_in(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _truncate(path: Path, keep: int | float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def _flip_bit(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated to half": lambda p: _truncate(p, 0.5),
    "truncated to its first 4 KiB": lambda p: _truncate(p, 4096),
    "one bit flipped in its code": lambda p: _flip_bit(p, 0.25),
    "one bit flipped in its ELF header": lambda p: _flip_bit(p, 0.00005),
    "garbage after an ELF magic": lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01" + os.urandom(64 * 1024)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_library_is_never_loaded_and_is_rebuilt(tmp_path, good_library, scan_inputs, damage):
    cache = tmp_path / "cache"
    path = entry_in(cache)
    install_entry(path, good_library)
    DAMAGE[damage](path)  # the library is damaged after its checksum was written
    name = "damaged-" + damage.replace(" ", "-")
    _, stderr = finish(cache_process(cache, good_library, scan_inputs, name)[0])
    assert f"cache entry {path} is unusable (its bytes do not match its checksum" in stderr
    assert compiles_in(good_library.parent / f"{name}.compiles") == 1
    assert_scan_matches_reference(np.load(good_library.parent / f"{name}.npy"), scan_inputs)
    assert_entry_verified(path, good_library)


def test_foreign_library_with_a_valid_checksum_is_rebuilt(tmp_path, good_library, scan_inputs):
    """A loadable shared library that is not a scan library (no scan functions) sits in the entry's place."""
    source = tmp_path / "foreign.c"
    source.write_text("int gspn_unrelated(void) { return 42; }\n")
    foreign = tmp_path / "foreign.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(foreign), str(source)], check=True)
    cache = tmp_path / "cache"
    path = entry_in(cache)
    install_entry(path, foreign)
    _, stderr = finish(cache_process(cache, good_library, scan_inputs, "foreign")[0])
    assert f"cache entry {path} is unusable (a library without the scan functions" in stderr
    assert compiles_in(good_library.parent / "foreign.compiles") == 1
    assert_scan_matches_reference(np.load(good_library.parent / "foreign.npy"), scan_inputs)
    assert_entry_verified(path, good_library)


def _read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def test_read_only_cache_with_a_valid_entry_loads_it(shared_dir, good_library, scan_inputs):
    cache = shared_dir / "read-only-valid"
    path = entry_in(cache)
    install_entry(path, good_library)
    _read_only(cache)
    _, stderr = finish(cache_process(cache, good_library, scan_inputs, "ro-valid", read_only=True)[0])
    assert compiles_in(shared_dir / "ro-valid.compiles") == 0 and "WARNING" not in stderr
    assert_scan_matches_reference(np.load(shared_dir / "ro-valid.npy"), scan_inputs)


def test_read_only_cache_with_a_damaged_entry_runs_from_memory(shared_dir, good_library, scan_inputs):
    cache = shared_dir / "read-only-damaged"
    path = entry_in(cache)
    install_entry(path, good_library)
    _truncate(path, 0.5)
    damaged = path.read_bytes()
    _read_only(cache)
    _, stderr = finish(cache_process(cache, good_library, scan_inputs, "ro-damaged", read_only=True)[0])
    assert "do not match its checksum" in stderr
    assert stderr.count("cannot write the kernel cache") == 1 and "without caching them" in stderr
    assert compiles_in(shared_dir / "ro-damaged.compiles") == 1
    assert_scan_matches_reference(np.load(shared_dir / "ro-damaged.npy"), scan_inputs)
    assert path.read_bytes() == damaged, "a read-only cache was written"


def test_concurrent_writers_compile_once_and_leave_a_verified_entry(tmp_path, good_library, scan_inputs):
    cache = tmp_path / "cache"
    processes = [cache_process(cache, good_library, scan_inputs, f"writer-{i}", compile_seconds=1.0) for i in range(3)]
    for process, _, output in processes:
        finish(process)
        assert_scan_matches_reference(np.load(output), scan_inputs)
    assert sum(compiles_in(log) for _, log, _ in processes) == 1, "writers did not wait for each other"
    path = entry_in(cache)
    assert_entry_verified(path, good_library)
    leftovers = sorted(p.name for p in path.parent.iterdir() if p.name.endswith((".so", ".tmp")) and p != path)
    assert leftovers == [], "temporary files left behind"
