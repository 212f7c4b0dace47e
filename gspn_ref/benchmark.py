"""Timing utilities shared by every benchmark: medians of repeated runs and the memory floor."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_time(fn: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 28, repeat: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeat=repeat, warmup=1)
    return 2 * src.numel() * 4 / seconds


def scan_bytes(B, C, G, H, W, dtype, backward: bool = False) -> int:
    """Bytes a scan must move at least: each input read once, each output written once.

    Forward reads ``x, lam`` and three weights, writes ``h``; backward reads ``gh, x, lam, h`` and
    three weights, writes ``dx, dlam`` and three weight gradients.
    """
    item = torch.finfo(dtype).bits // 8
    full, weight = B * C * H * W, B * G * H * W
    if backward:
        return item * (6 * full + 6 * weight)
    return item * (3 * full + 3 * weight)


def machine_description() -> str:
    """One line naming the CPU, the core count and the torch thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as an aligned text table with the given columns."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def save_json(path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def scan_row(name: str, shape, dtype, seconds: float, bandwidth: float, backward: bool = False, **extra) -> dict:
    """One benchmark row: time, effective bandwidth and ratio to the memory floor."""
    B, C, G, H, W = shape
    nbytes = scan_bytes(B, C, G, H, W, dtype, backward)
    floor = nbytes / bandwidth
    return {
        "kernel": name,
        "pass": "backward" if backward else "forward",
        "shape (B,C,G,H,W)": "x".join(map(str, shape)),
        "dtype": str(dtype).replace("torch.", ""),
        "ms": round(seconds * 1e3, 3),
        "GB/s": round(nbytes / seconds / 1e9, 2),
        "x floor": round(seconds / floor, 2),
        **extra,
    }
