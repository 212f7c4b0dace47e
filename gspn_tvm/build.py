"""Compile the scan kernels for a target and keep them in an on-disk cache.

One compiled library per ``(target, dtype)`` holds the forward and adjoint scans of all four
directions (8 functions; every shape is symbolic); a second one, the ``"fused"`` library, holds the
fused forward scans (``gspn::fused_scan``, 4 functions), so that a process using only the scan never
compiles them. Libraries live under

    $GSPN_CACHE_DIR (default ~/.cache/gspn/tvm) / <tvm version> / <target hash> / <kernel hash> / <dtype>.so
    (the fused library: ``fused-<dtype>.so`` beside it)

The target hash covers the resolved CPU target (:mod:`gspn_tvm.isa`: a level such as
``x86-64-v3`` chosen from the features the OS reports), so a cache shared between machines never
hands one machine another's code. The kernel hash covers the source of the compute definition and
of the target's schedule, so editing either makes old entries unreachable.

Each entry has a checksum file beside it, ``<dtype>.so.sha256`` (JSON: the sha256 of the library
and the device, dtype, target and kernel hash it was built for). A library is loaded only after its
bytes match that record: a truncated or corrupt file is never handed to the dynamic loader (that
would kill the process with SIGBUS or SIGSEGV). An entry that fails the check, or loads without the
scan functions, is rebuilt with a logged warning. Writers hold a lock file per entry, compile, load
the library they just wrote to a private temporary file, then publish it with ``os.replace`` and
write the checksum file the same way: concurrent processes compile once and never see half a file.
Where the cache cannot be written (read-only, not a folder, a folder in the entry's place) the
compiled library is used from a private temporary file, with one warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import tvm

from gspn_ref.directions import DIRECTIONS

from . import compute, isa
from .runtime_loader import sha256_of
from .schedules import cpu as cpu_schedule
from .schedules import cuda as cuda_schedule

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
SCHEDULES = {"cpu": cpu_schedule, "cuda": cuda_schedule}
CUDA_ARCH = os.environ.get("GSPN_CUDA_ARCH", "sm_90")
CHECKSUM_SUFFIX = ".sha256"
#: The libraries of a ``(device, dtype)``: the scan (forward and adjoint) and the fused forward.
LIBRARIES = ("scan", "fused")

#: Seconds spent in the last compile and the last cached load, per ``(device, dtype)``.
timings: dict[tuple[str, str], dict[str, float]] = {}


def cpu_target() -> dict:
    """LLVM target for this machine: the x86-64 level its reported features allow (:mod:`gspn_tvm.isa`)."""
    return isa.llvm_target()


def cuda_target(arch: str = CUDA_ARCH) -> dict:
    """CUDA target for ``arch`` (default ``sm_90``, the H100); host code for LLVM's generic CPU."""
    return {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}}


def target_for(device: str) -> dict:
    if device not in SCHEDULES:
        raise ValueError(f"device: expected one of {tuple(SCHEDULES)}; got {device!r}")
    return cpu_target() if device == "cpu" else cuda_target()


def cache_root() -> Path:
    """Root of the per-user kernel cache (``$GSPN_CACHE_DIR`` or ``~/.cache/gspn/tvm``)."""
    return Path(os.environ.get("GSPN_CACHE_DIR") or Path.home() / ".cache" / "gspn" / "tvm")


def kernel_hash(device: str) -> str:
    """Hash of the compute definition and the schedule used for ``device`` (the kernel version)."""
    digest = hashlib.sha256()
    for module in (compute, SCHEDULES[device]):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def target_key(target: dict) -> str:
    return hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:16]


def _check_library(library: str) -> None:
    if library not in LIBRARIES:
        raise ValueError(f"library: expected one of {LIBRARIES}; got {library!r}")


def cache_path(device: str, dtype: str, library: str = "scan") -> Path:
    """Where the ``library`` for ``device``/``dtype`` and this machine's resolved target is cached."""
    _check_library(library)
    name = f"{dtype}.so" if library == "scan" else f"{library}-{dtype}.so"
    return cache_root() / tvm.__version__ / target_key(target_for(device)) / kernel_hash(device) / name


def checksum_path(path: Path) -> Path:
    """The checksum file beside the cache entry ``path``."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def entry_record(device: str, dtype: str, library: str = "scan") -> dict:
    """What an entry for ``device``/``dtype`` must have been built for (its checksum file, less sha256)."""
    return {"device": device, "dtype": dtype, "target": target_for(device), "kernel": kernel_hash(device),
            "tvm": tvm.__version__, "library": library}  # fmt: skip


def _library_functions(library: str, device: str = "cpu") -> dict[str, tuple[str, str, dict]]:
    """Symbol -> (schedule function of the target's schedule module, direction, its options) of
    ``library``; on CPU the forwards (and the scan's adjoints) also come as lane kernels for small
    planes (see :func:`gspn_tvm.schedules.cpu.lanes_serve`), on CUDA as line pipelines for lines of up to 1024
    positions and (row scans) as a wide variant for longer rows (see
    :func:`gspn_tvm.schedules.cuda.forward_symbol`)."""
    _check_library(library)
    if library == "fused":
        forwards = {compute.fused_forward_name(d): ("schedule_fused_forward", d, {}) for d in DIRECTIONS}
        functions = dict(forwards)
    else:
        forwards = {compute.forward_name(d): ("schedule_forward", d, {}) for d in DIRECTIONS}
        functions = {**forwards, **{compute.backward_name(d): ("schedule_backward", d, {}) for d in DIRECTIONS}}
    if device == "cpu":
        lanes = "schedule_fused_forward_lanes" if library == "fused" else "schedule_forward_lanes"
        functions.update({compute.lanes_name(symbol): (lanes, direction, {}) for symbol, (_, direction, _) in forwards.items()})
        if library == "scan":
            functions.update({compute.lanes_name(compute.backward_name(d)): ("schedule_backward_lanes", d, {})
                              for d in DIRECTIONS})  # fmt: skip
    if device == "cuda":
        pipeline = "line_pipeline_fused_forward" if library == "fused" else "line_pipeline_forward"
        for symbol, (rule, direction, _) in forwards.items():
            for threads in cuda_schedule.LINE_THREADS:
                functions[cuda_schedule.line_class_name(symbol, threads)] = (pipeline, direction, {"threads": threads})
            if direction in cuda_schedule.WIDE_DIRECTIONS:
                functions[cuda_schedule.wide_name(symbol)] = (rule, direction, {"threads": cuda_schedule.WIDE_THREADS})
    return functions


def function_names(library: str = "scan", device: str = "cpu") -> list[str]:
    """The functions of a library: the scan's 8 (forward and adjoint for every direction), the
    fused library's 4 (the fused forward for every direction); plus the forward variants (CPU: lane
    kernels; CUDA: line pipelines, wide rows)."""
    return list(_library_functions(library, device))


def scan_module(device: str, dtype: str, library: str = "scan") -> tvm.IRModule:
    """The scheduled IRModule of ``library`` (every direction) for ``device`` and ``dtype``."""
    schedule = SCHEDULES[device]
    functions = {symbol: getattr(schedule, rule)(direction, dtype, **options).with_attr("global_symbol", symbol)
                 for symbol, (rule, direction, options) in _library_functions(library, device).items()}  # fmt: skip
    return tvm.IRModule(functions)


def compile_scan(device: str, dtype: str, library: str = "scan"):
    """Compile ``library`` for ``device`` ("cpu" or "cuda") and ``dtype``; returns the executable."""
    config, disabled = {}, []
    if device == "cpu":
        # Every staged buffer of the CPU kernels is declared at the size it is used at; TVM's
        # CompactBufferAllocation would only re-derive those sizes, and on the index expressions
        # of the lane and column-tile kernels it took 70-90% of their compile time (float32 scan
        # library: ~50 s with it, see the README).
        disabled.append("s_tir.CompactBufferAllocation")
    if device == "cuda":
        # TVM 0.27's common-subexpression pass leaves a use before its definition in the adjoint
        # kernel; nvcc eliminates the repeated index arithmetic itself.
        config["tirx.disable_cse_tir"] = True
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        importlib.import_module("tvm.support.nvcc")  # registers the CUDA compile callback
    with tvm.transform.PassContext(opt_level=3, config=config, disabled_pass=disabled):
        return tvm.compile(scan_module(device, dtype, library), target=tvm.target.Target(target_for(device)))


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_atomically(executable, path: Path, record: dict | None = None):
    """Write ``executable`` as a library at ``path`` (temporary file + ``os.replace``), then its
    checksum file; returns the library loaded from the bytes just written (never from ``path``,
    which another process may replace meanwhile). Raises OSError where the folder is not writable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        digest = sha256_of(tmp)
        library = tvm.runtime.load_module(tmp)
        os.replace(tmp, path)
        write_atomically(checksum_path(path), json.dumps({**(record or {}), "sha256": digest}, sort_keys=True))
        return library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_from_memory(executable):
    """The library of ``executable`` loaded without the cache (a private temporary file, removed)."""
    with tempfile.TemporaryDirectory(prefix="gspn-tvm-") as folder:
        file = os.path.join(folder, "scan.so")
        executable.export_library(file)
        return tvm.runtime.load_module(file)


def verify_entry(path: Path, record: dict) -> str | None:
    """Why the cache entry ``path`` may not be loaded (None: its bytes match its checksum file).

    Only reads files: nothing is loaded before the check passes.
    """
    if not path.is_file():
        return f"{path.name} is not a regular file"
    try:
        stored = json.loads(checksum_path(path).read_text())
    except FileNotFoundError:
        return "no checksum file beside it"
    except (OSError, ValueError) as error:
        return f"unreadable checksum file ({error})"
    if not isinstance(stored, dict):
        return "malformed checksum file"
    for field, want in record.items():
        if stored.get(field) != want:
            return f"built for {field}={stored.get(field)!r}, not {want!r}"
    try:
        digest = sha256_of(path)
    except OSError as error:
        return f"unreadable ({error})"
    if digest != stored.get("sha256"):
        return "its bytes do not match its checksum (truncated or corrupt)"
    return None


def _load_entry(path: Path, record: dict):
    """``(library, None)`` for a verified entry; ``(None, reason)`` otherwise (``reason`` None: no entry)."""
    kind = record.get("library", "scan")
    names = function_names(kind, record["device"])
    if not path.exists() and not path.is_symlink():
        return None, None
    problem = verify_entry(path, record)
    if problem is not None:
        return None, problem
    try:
        library = tvm.runtime.load_module(str(path))
    except RuntimeError as error:
        return None, f"not loadable ({error})"
    missing = [name for name in names if not library.implements_function(name, True)]
    if missing:
        return None, f"a library without the {'scan' if kind == 'scan' else kind + ' scan'} functions ({', '.join(missing[:2])}...)"
    return library, None


@contextlib.contextmanager
def entry_lock(path: Path):
    """Exclusive lock of the cache entry ``path`` (none where its folder cannot be written); also
    the Relax model cache's (:mod:`gspn_tvm.model_cache`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.name}.lock", "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_scan_library(device: str, dtype: str, library: str = "scan"):
    """The compiled ``library`` (``"scan"`` or ``"fused"``) for ``device`` and ``dtype``: from the
    cache, else compiled and cached."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}; got {dtype!r}")
    kind = library  # the name ``library`` is the loaded module below
    path = cache_path(device, dtype, kind)
    record = entry_record(device, dtype, kind)
    key = (device, dtype) if kind == "scan" else (device, dtype, kind)
    start = time.perf_counter()
    library, problem = _load_entry(path, record)
    if library is None:
        with entry_lock(path):
            library, problem = _load_entry(path, record)  # another process may have built it meanwhile
            if library is None:
                if problem is not None:
                    logger.warning("gspn_tvm: cache entry %s is unusable (%s); rebuilding it", path, problem)
                start = time.perf_counter()
                executable = compile_scan(*key)
                timings.setdefault(key, {})["compile_s"] = time.perf_counter() - start
                start = time.perf_counter()
                try:
                    library = export_atomically(executable, path, record)
                except OSError as error:
                    logger.warning(
                        "gspn_tvm: cannot write the kernel cache at %s (%s); using the compiled kernels "
                        "without caching them (set GSPN_CACHE_DIR to a writable folder)", path, error,
                    )  # fmt: skip
                    library = load_from_memory(executable)
    timings.setdefault(key, {})["load_s"] = time.perf_counter() - start
    return library
