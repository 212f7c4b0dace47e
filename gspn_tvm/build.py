"""Compile the scan kernels for a target and keep them in an on-disk cache.

One compiled library per ``(target, dtype)`` holds the forward and adjoint scans of all four
directions (8 functions; every shape is symbolic). Libraries live under

    $GSPN_CACHE_DIR (default ~/.cache/gspn/tvm) / <tvm version> / <target hash> / <kernel hash> / <dtype>.so

where the kernel hash covers the source of the compute definition and of the target's schedule, so
editing either makes old entries unreachable (stale entries are never loaded). Writes go to a
temporary file in the same folder and are published with ``os.replace``: two processes compiling at
once both end with a complete library. An entry that fails to load is rebuilt in place.
"""

from __future__ import annotations

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

from . import compute
from .schedules import cpu as cpu_schedule
from .schedules import cuda as cuda_schedule

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
SCHEDULES = {"cpu": cpu_schedule, "cuda": cuda_schedule}
CUDA_ARCH = os.environ.get("GSPN_CUDA_ARCH", "sm_90")

#: Seconds spent in the last compile and the last cached load, per ``(device, dtype)``.
timings: dict[tuple[str, str], dict[str, float]] = {}


def cpu_target() -> dict:
    """LLVM target for this machine's CPU (its own instruction set, e.g. AVX-512 where present)."""
    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}


def cuda_target(arch: str = CUDA_ARCH) -> dict:
    """CUDA target for ``arch`` (default ``sm_90``, the H100), host code for this CPU's LLVM."""
    return {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}}


def target_for(device: str) -> dict:
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


def cache_path(device: str, dtype: str) -> Path:
    target_key = hashlib.sha256(json.dumps(target_for(device), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / tvm.__version__ / target_key / kernel_hash(device) / f"{dtype}.so"


def scan_module(device: str, dtype: str) -> tvm.IRModule:
    """The scheduled IRModule: forward and adjoint for every direction, for ``device`` and ``dtype``."""
    schedule = SCHEDULES[device]
    functions = {}
    for direction in DIRECTIONS:
        functions[compute.forward_name(direction)] = schedule.schedule_forward(direction, dtype)
        functions[compute.backward_name(direction)] = schedule.schedule_backward(direction, dtype)
    return tvm.IRModule(functions)


def compile_scan(device: str, dtype: str):
    """Compile the scan library for ``device`` ("cpu" or "cuda") and ``dtype``; returns the executable."""
    config = {}
    if device == "cuda":
        # TVM 0.27's common-subexpression pass leaves a use before its definition in the adjoint
        # kernel; nvcc eliminates the repeated index arithmetic itself.
        config["tirx.disable_cse_tir"] = True
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        importlib.import_module("tvm.support.nvcc")  # registers the CUDA compile callback
    with tvm.transform.PassContext(opt_level=3, config=config):
        return tvm.compile(scan_module(device, dtype), target=tvm.target.Target(target_for(device)))


def export_atomically(executable, path: Path) -> None:
    """Write ``executable`` as a shared library at ``path`` via a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_scan_library(device: str, dtype: str):
    """The compiled scan library for ``device`` and ``dtype``: from the cache, else compiled and cached."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}; got {dtype!r}")
    path = cache_path(device, dtype)
    key = (device, dtype)
    if path.exists():
        start = time.perf_counter()
        try:
            library = tvm.runtime.load_module(str(path))
            library[compute.forward_name(DIRECTIONS[0])]  # a truncated file fails here, not later
            timings.setdefault(key, {})["load_s"] = time.perf_counter() - start
            return library
        except Exception as error:  # corrupt or foreign entry: rebuild it
            logger.warning("gspn_tvm: rebuilding unreadable cache entry %s (%s)", path, error)
    start = time.perf_counter()
    executable = compile_scan(device, dtype)
    timings.setdefault(key, {})["compile_s"] = time.perf_counter() - start
    export_atomically(executable, path)
    start = time.perf_counter()
    library = tvm.runtime.load_module(str(path))
    timings[key]["load_s"] = time.perf_counter() - start
    return library
