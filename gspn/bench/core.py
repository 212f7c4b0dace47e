"""The benchmark core: one timer, the memory floor, one row format and one results schema.

A *row* is a flat dict with the keys of :data:`ROW_KEYS` (absent values are ``None``):

    table        which table the row belongs to ("scan", "model", "compile", ...)
    case         what was run, e.g. "1x192x192x56x56" (B x C x G x H x W) or "GSPN-T b8 224"
    direction    scan direction, or "all" for layers and networks
    pass         "forward" or "backward"
    backend      who ran it, e.g. "tvm-cpu", "ort-custom", "torch-reference"
    dtype        storage dtype
    ms           median wall time in milliseconds
    floor_ms     memory floor: bytes the pass must move / copy bandwidth measured in the same run
    x_floor      ms / floor_ms
    baseline     backend the speedup is measured against (same table, case, direction, pass)
    speedup      baseline ms / ms
    extra        any further measured values (scan share, peak resident memory, ...)

The results file is ``{"schema": SCHEMA, "machine": {...}, "copy_GBps": ..., "rows": [...]}``.
This module imports only the standard library and torch, so that the GPU check can use it on a
machine where nothing else is installed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

SCHEMA = "gspn-bench/1"
ROW_KEYS = ("table", "case", "direction", "pass", "backend", "dtype", "ms", "floor_ms", "x_floor",
            "baseline", "speedup", "extra")  # fmt: skip


def median_seconds(fn: Callable[[], object], repeat: int = 10, warmup: int = 2,
                   synchronize: Callable[[], None] | None = None) -> float:  # fmt: skip
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) is called before each clock reading, so that
    asynchronous device work is counted.
    """
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 28, repeat: int = 5) -> float:
    """Bytes per second of a large float32 tensor copy (read + write counted), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeat=repeat, warmup=1)
    return 2 * src.numel() * 4 / seconds


def scan_bytes(B: int, C: int, G: int, H: int, W: int, dtype: torch.dtype, backward: bool = False) -> int:
    """Bytes a scan must move at least: each input read once, each output written once.

    Forward reads ``x, lam`` (B, C, H, W) and three weights (B, G, H, W), writes ``h``; backward reads
    ``gh, x, lam, h`` and three weights, writes ``dx, dlam`` and three weight gradients.
    """
    item = torch.finfo(dtype).bits // 8
    full, weight = B * C * H * W, B * G * H * W
    if backward:
        return item * (6 * full + 6 * weight)
    return item * (3 * full + 3 * weight)


def fused_scan_bytes(B: int, C: int, G: int, H: int, W: int, dtype: torch.dtype) -> int:
    """Bytes the fused scan's forward must move at least: reads ``u, lam, gate, skip`` (B, C, H, W)
    and three logits (B, G, H, W), writes ``y``."""
    item = torch.finfo(dtype).bits // 8
    return item * (5 * B * C * H * W + 3 * B * G * H * W)


def cpu_name() -> str:
    """The CPU's model name as the OS reports it (for reports only: never used to generate code)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, memory, torch and its thread count."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError):
        memory_gib = None
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_GiB": memory_gib,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # torch's OpenMP threads spin between ops unless this is "passive" (read at import torch);
        # spinning competes with TVM's and ONNX Runtime's pools on a small machine.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
    }


def describe(machine_info: dict) -> str:
    """One line: ``AMD EPYC, 2 cores, 23.4 GiB, torch 2.13.0+cpu (2 threads)``."""
    m = machine_info
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_GiB']} GiB, torch {m['torch']} ({m['torch_threads']} threads)"


def _significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (times span microseconds to seconds)."""
    return float(f"{value:.{digits}g}")


def row(table: str, case: str, backend: str, seconds: float | None, *, direction: str = "all", pass_: str = "forward",
        dtype: str = "float32", floor_seconds: float | None = None, **extra) -> dict:  # fmt: skip
    """One benchmark row (see the module docstring); ``extra`` keyword values go under ``"extra"``.
    ``seconds=None`` for a row that measures something other than time (``ms`` is then None)."""
    timed = seconds is not None
    return {
        "table": table,
        "case": case,
        "direction": direction,
        "pass": pass_,
        "backend": backend,
        "dtype": dtype,
        "ms": _significant(seconds * 1e3) if timed else None,
        "floor_ms": None if floor_seconds is None else _significant(floor_seconds * 1e3),
        "x_floor": None if floor_seconds is None or not timed else _significant(seconds / floor_seconds, 3),
        "baseline": None,
        "speedup": None,
        "extra": extra,
    }


def add_speedups(rows: list[dict], baseline: str) -> list[dict]:
    """Fill ``baseline``/``speedup`` of every row against the ``baseline`` backend's row of the same
    table, case, direction, pass and dtype (rows without such a twin keep ``None``)."""
    def key(r):
        return r["table"], r["case"], r["direction"], r["pass"], r["dtype"]

    reference = {key(r): r["ms"] for r in rows if r["backend"] == baseline}
    for r in rows:
        base = reference.get(key(r))
        if base is not None and r["ms"]:
            r["baseline"], r["speedup"] = baseline, round(base / r["ms"], 2)
    return rows


def format_table(rows: Iterable[dict], columns: list[str]) -> str:
    """``rows`` as an aligned text table; a column may name a key of ``extra``."""
    def cell(r, c):
        value = r.get(c, r.get("extra", {}).get(c))
        return "" if value is None else str(value)

    rows = list(rows)
    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def save_results(path: str | os.PathLike, rows: list[dict], machine_info: dict, **fields) -> Path:
    """Write the results file (schema in the module docstring); returns its path."""
    for r in rows:
        missing = set(ROW_KEYS) - set(r)
        if missing:
            raise ValueError(f"rows: every row needs the keys {ROW_KEYS}; a row lacks {sorted(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "machine": machine_info, **fields, "rows": rows}, indent=1))
    return path


def load_results(path: str | os.PathLike) -> dict:
    """Read a results file, refusing another schema."""
    payload = json.loads(Path(path).read_text())
    if payload.get("schema") != SCHEMA:
        raise ValueError(f"{path}: expected a results file of schema {SCHEMA!r}; got {payload.get('schema')!r}")
    return payload
