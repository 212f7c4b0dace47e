"""``gspn bench``: every table, printed, saved as one results file, and plotted."""

from __future__ import annotations

import os
import tempfile
import time

import torch

from . import crossover, fused, layer_profile, models, scans
from .core import add_speedups, copy_bandwidth, describe, format_table, machine, row, save_results
from .plot import plot_results

COMPILE_COLUMNS = ["case", "backend", "ms", "extra"]


def compile_rows(dtype: str = "float32") -> list[dict]:
    """Table ``"compile"``: a fresh TVM scan library (compile + export) and its cached load."""
    from gspn_tvm import build

    saved = os.environ.get("GSPN_CACHE_DIR")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["GSPN_CACHE_DIR"] = folder
        try:
            start = time.perf_counter()
            build.load_scan_library("cpu", dtype)
            first = time.perf_counter() - start
            start = time.perf_counter()
            build.load_scan_library("cpu", dtype)
            cached = time.perf_counter() - start
        finally:
            if saved is None:
                os.environ.pop("GSPN_CACHE_DIR", None)
            else:
                os.environ["GSPN_CACHE_DIR"] = saved
    case = f"TVM CPU scan library ({dtype}, {len(build.function_names('scan', 'cpu'))} functions)"
    return [row("compile", case, "first use (compile + cache)", first, dtype=dtype),
            row("compile", case, "cached load", cached, dtype=dtype)]  # fmt: skip


def soak_rows(quick: bool) -> list[dict]:
    """Table ``"soak"``: resident-memory growth over many runs of each native boundary, and one
    session run from many threads (``ms`` is the time of the whole soak)."""
    from export import soak as ort_soak
    from gspn_tvm import soak as tvm_soak

    cycles = 200 if quick else 2000
    rows = []
    start = time.perf_counter()
    report = ort_soak.session_cycles(cycles)
    rows.append(row("soak", f"{cycles} session create/run/destroy cycles", "ort-custom", time.perf_counter() - start,
                    growth_MiB=round(report["growth"] / 2**20, 2), bound_MiB=round(report["bound"] / 2**20, 2),
                    ok=report["ok"]))  # fmt: skip
    start = time.perf_counter()
    report = ort_soak.threaded_runs(8, 200)
    rows.append(row("soak", "8 threads x 200 runs on one session", "ort-custom", time.perf_counter() - start,
                    outputs=report["produced"], differing_bitwise=report["differing"], ok=report["ok"]))  # fmt: skip
    for kernel in tvm_soak.soak(cycles):
        rows.append(row("soak", f"{kernel['calls']} calls of {kernel['kernel']}", "tvm-cpu", None,
                        growth_KiB=kernel["growth_kib"], ok=kernel["within_bound"]))  # fmt: skip
    return rows


def run(json_path: str | os.PathLike = "out/bench.json", quick: bool = False) -> dict:
    """Run every benchmark, print the tables, save ``json_path`` and its plots; returns the payload."""
    torch.manual_seed(0)
    info = machine()
    print(f"machine: {describe(info)}")
    bandwidth = copy_bandwidth(1 << 26 if quick else 1 << 28)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    rows: list[dict] = []

    print("\n== compile and cache")
    rows += compile_rows()
    print(format_table([r for r in rows if r["table"] == "compile"], COMPILE_COLUMNS))

    print("\n== the scan per backend, against the reference and the memory floor")
    rows += scans.run(quick=quick, bandwidth=bandwidth)
    add_speedups(rows, "torch-reference")
    print(format_table([r for r in rows if r["table"] == "scan"], scans.COLUMNS))

    print("\n== the fused scan (logits, gate and skip in) against the unfused ops it replaces")
    rows += fused.run(quick=quick, bandwidth=bandwidth)
    add_speedups(rows, "torch-reference")
    print(format_table([r for r in rows if r["table"] == "fused"], fused.COLUMNS))

    print("\n== where the GSPN layer's time goes, without and with the fused scan (torch eager, TVM kernels)")
    rows += layer_profile.run(quick=quick)
    print(format_table([r for r in rows if r["table"] == "layer_profile"], layer_profile.COLUMNS))

    print("\n== layers and networks per backend (forward, float32)")
    rows += models.run(quick=quick)
    add_speedups(rows, "torch-reference")
    print(format_table([r for r in rows if r["table"] == "model"], models.COLUMNS))

    print("\n== the GSPN layer against attention over the same tokens (forward, float32)")
    rows += crossover.run(quick=quick)
    print(format_table([r for r in rows if r["table"] == "crossover"], crossover.COLUMNS))
    print("smallest side from which the layer is faster:", crossover.crossover_sides(rows))

    print("\n== resident memory over many runs")
    rows += soak_rows(quick)
    print(format_table([r for r in rows if r["table"] == "soak"], ["case", "backend", "ms", "extra"]))

    payload = {"schema": None, "machine": info, "copy_GBps": round(bandwidth / 1e9, 2), "rows": rows}
    path = save_results(json_path, rows, info, copy_GBps=payload["copy_GBps"], quick=quick)
    for plot in plot_results(payload, path):
        print(f"plot: {plot}")
    print(f"saved {path}")
    return payload
