"""Resource checks of the ONNX Runtime custom operator: memory over many sessions, threads.

    python -m export.soak [--cycles 2000] [--threads 8] [--runs 200] [--library PATH]

* ``session_cycles``: create a session with the gspn library, run it, delete it, many times; the
  resident memory after the cycles may exceed that after a warm-up by at most a stated bound.
* ``scratch_release``: a tall column scan (whose strips would have needed hundreds of MB of
  scratch) leaves no memory behind once its session is gone.
* ``threaded_runs``: one session run from many threads gives bitwise-identical outputs.

Each returns a small report (a dict); ``main`` runs all three and exits 1 if a bound is broken.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
from pathlib import Path

import numpy as np

# Allocator noise: glibc keeps freed blocks in its arenas and onnxruntime its own caches (about
# 1 MiB over 2000 cycles, measured). A leak of one output or of the scratch of one run per cycle
# would exceed this within 100 cycles.
SESSION_CYCLES_GROWTH_BOUND_BYTES = 4 * 2**20
SCRATCH_RELEASE_BOUND_BYTES = 48 * 2**20


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def scan_inputs(B, C, G, H, W, seed=0) -> dict[str, np.ndarray]:
    """Feeds of a scan model: x, lam (B, C, H, W) normal; gl, gm, gr (B, G, H, W) in [0, 1/3)."""
    rng = np.random.default_rng(seed)
    data = lambda channels: rng.standard_normal((B, channels, H, W), dtype=np.float32)  # noqa: E731
    weights = rng.uniform(0.0, 1.0 / 3.0, size=(3, B, G, H, W)).astype(np.float32)
    return {"x": data(C), "lam": data(C), "gl": weights[0], "gm": weights[1], "gr": weights[2]}


def custom_session(model_bytes: bytes, library: Path | None, threads: int = 1):
    """A CPU session with the gspn library (``library``, default the built one) registered."""
    import onnxruntime as ort

    from .runtime import library_path

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library or library_path()))
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def scan_model_bytes(direction: str, chunk: int = 0) -> bytes:
    """A serialized float32 one-scan model (``export.scan_model``)."""
    from .onnx_export import scan_model

    return scan_model(direction, chunk).SerializeToString()


def session_cycles(cycles: int = 2000, warmup: int = 50, library: Path | None = None) -> dict:
    """``cycles`` create/run/destroy cycles of a session, after ``warmup`` such cycles.

    Directions alternate between a row and a column scan. Returns the RSS after the warm-up,
    after the cycles, the growth and the bound.
    """
    models = [scan_model_bytes("t2b", 3), scan_model_bytes("l2r", 0)]
    feeds = scan_inputs(2, 8, 4, 64, 64)  # 256 KiB per (B, C, H, W) tensor

    def cycle(k: int) -> None:
        session = custom_session(models[k % 2], library)
        session.run(None, feeds)
        del session

    for k in range(warmup):
        cycle(k)
    gc.collect()
    before = rss_bytes()
    for k in range(cycles):
        cycle(k)
    gc.collect()
    after = rss_bytes()
    return {
        "cycles": cycles, "rss_before": before, "rss_after": after, "growth": after - before,
        "bound": SESSION_CYCLES_GROWTH_BOUND_BYTES,
        "ok": after - before <= SESSION_CYCLES_GROWTH_BOUND_BYTES,
    }  # fmt: skip


def scratch_release(height: int = 2**20, width: int = 16, library: Path | None = None) -> dict:
    """RSS growth left by one tall column scan (l2r, float32) once its session is deleted.

    Run on the calling thread (one intra-op thread), which is the thread that used to keep a
    scratch of 6 x 16 x H floats for the life of the process.
    """
    feeds = scan_inputs(1, 1, 1, height, width)
    model = scan_model_bytes("l2r", 0)
    gc.collect()
    before = rss_bytes()
    session = custom_session(model, library, threads=1)
    (output,) = session.run(None, feeds)
    peak = rss_bytes()
    del session, output
    gc.collect()
    after = rss_bytes()
    return {
        "shape": (1, 1, height, width), "rss_before": before, "rss_during": peak,
        "growth": after - before, "bound": SCRATCH_RELEASE_BOUND_BYTES,
        "ok": after - before <= SCRATCH_RELEASE_BOUND_BYTES,
    }  # fmt: skip


def threaded_runs(threads: int = 8, runs: int = 200, library: Path | None = None) -> dict:
    """``threads`` threads each running one shared session ``runs`` times (r2l, 2 intra-op threads).

    Returns how many outputs were produced and how many differ (bitwise) from a first run.
    """
    session = custom_session(scan_model_bytes("r2l", 5), library, threads=2)
    feeds = scan_inputs(2, 8, 4, 33, 41, seed=3)
    (expected,) = session.run(None, feeds)
    differing, produced, errors = 0, 0, []
    lock = threading.Lock()

    def worker() -> None:
        nonlocal differing, produced
        try:
            for _ in range(runs):
                (out,) = session.run(None, feeds)
                same = out.dtype == expected.dtype and out.tobytes() == expected.tobytes()
                with lock:
                    produced += 1
                    differing += not same
        except BaseException as error:  # reported to the caller
            with lock:
                errors.append(repr(error))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {
        "threads": threads, "runs": runs, "produced": produced, "differing": differing,
        "errors": errors, "ok": not errors and differing == 0 and produced == threads * runs,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--library", type=Path, default=None, help="default: the built library")
    args = parser.parse_args(argv)
    mib = lambda n: f"{n / 2**20:+.1f} MiB"  # noqa: E731
    cycles = session_cycles(args.cycles, library=args.library)
    print(f"{cycles['cycles']} session create/run/destroy cycles: RSS {mib(cycles['growth'])} "
          f"(bound {mib(cycles['bound'])})")  # fmt: skip
    scratch = scratch_release(library=args.library)
    print(f"tall column scan {scratch['shape']}: RSS {mib(scratch['growth'])} after the session "
          f"is deleted (bound {mib(scratch['bound'])}; {mib(scratch['rss_during'] - scratch['rss_before'])} "
          "while it exists)")  # fmt: skip
    threaded = threaded_runs(args.threads, args.runs, library=args.library)
    print(f"{threaded['threads']} threads x {threaded['runs']} runs on one session: "
          f"{threaded['produced']} outputs, {threaded['differing']} differ bitwise from the first"
          + (f", errors: {threaded['errors'][:3]}" if threaded["errors"] else ""))  # fmt: skip
    return 0 if cycles["ok"] and scratch["ok"] and threaded["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
