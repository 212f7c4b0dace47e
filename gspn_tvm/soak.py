"""Resident-memory soak of the TVM scan kernels (issue 8, part 3).

Each kernel (forward and adjoint, every direction) is called ``calls`` times on the same inputs
after a warm-up; the growth of the process's resident memory over those calls must stay within
:data:`GROWTH_BOUND_BYTES`. A kernel that leaked its output, its workspace or a library handle per
call would grow by at least its output size per call (a few hundred KiB here, so 100 MiB and more
over 2000 calls). ``python -m gspn_tvm.soak [calls]`` prints one row per kernel; the test suite runs
a few hundred calls, the benchmark the full 2000.
"""

from __future__ import annotations

import gc
import os
import sys

import torch

from gspn_ref import DIRECTIONS

from . import kernels

#: Largest resident-memory growth accepted over a soak, whatever the number of calls.
GROWTH_BOUND_BYTES = 8 * 2**20
#: Inputs of every call: B, C, G, H, W (each output ~200 KiB in float32).
SHAPE = (2, 8, 4, 48, 64)


def resident_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; elsewhere the peak, from rusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _inputs(dtype: torch.dtype, direction: str):
    B, C, G, H, W = SHAPE
    gen = torch.Generator().manual_seed(0)
    x, lam = (torch.randn(B, C, H, W, generator=gen).to(dtype) for _ in range(2))
    gl, gm, gr = (torch.rand(B, G, H, W, generator=gen).to(dtype) / 3 for _ in range(3))
    return x, lam, gl, gm, gr


def soak(calls: int = 2000, dtype: torch.dtype = torch.float32, warmup: int = 20) -> list[dict]:
    """One row per kernel: ``kernel``, ``calls``, ``rss_before_mib``, ``growth_kib``, ``within_bound``."""
    rows = []
    for direction in DIRECTIONS:
        x, lam, gl, gm, gr = _inputs(dtype, direction)
        h = kernels.scan_forward(x, lam, gl, gm, gr, direction, 3)
        gh = torch.randn_like(x)
        calls_of = {
            f"forward_{direction}": lambda: kernels.scan_forward(x, lam, gl, gm, gr, direction, 3),
            f"backward_{direction}": lambda: kernels.scan_backward(gh, x, lam, gl, gm, gr, h, direction, 3),
        }
        for name, call in calls_of.items():
            for _ in range(warmup):
                call()
            gc.collect()
            before = resident_bytes()
            for _ in range(calls):
                call()
            gc.collect()
            growth = resident_bytes() - before
            rows.append(
                {
                    "kernel": name,
                    "calls": calls,
                    "rss_before_mib": round(before / 2**20, 1),
                    "growth_kib": growth // 1024,
                    "within_bound": growth <= GROWTH_BOUND_BYTES,
                }
            )
    return rows


def main(calls: int = 2000) -> list[dict]:
    """Soak every kernel ``calls`` times in float32 and print the table; returns the rows."""
    rows = soak(calls)
    print(f"TVM kernel soak: {calls} calls each, shape (B, C, G, H, W) = {SHAPE}, bound {GROWTH_BOUND_BYTES // 2**20} MiB")
    for row in rows:
        print("  {kernel:<14} rss {rss_before_mib:>8} MiB  growth {growth_kib:>6} KiB  {verdict}".format(
            verdict="ok" if row["within_bound"] else "OVER BOUND", **row))
    return rows


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
