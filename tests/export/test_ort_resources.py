"""Resources of the ONNX Runtime custom operator: no memory growth over sessions, no scratch kept
after a session, identical outputs from many threads (``export.soak``; the benchmark runs the
full 2000 cycles with ``python -m export.soak``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import gspn_ref
from export import soak
from helpers import assert_close_scaled

REPO_ROOT = Path(__file__).resolve().parents[2]


def soak_in_subprocess(call: str) -> dict:
    """Runs ``export.soak.<call>`` in a fresh interpreter (clean RSS), returns its report."""
    script = f"import json; from export import soak; print(json.dumps(soak.{call}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_session_create_run_destroy_cycles_keep_rss_bounded():
    report = soak_in_subprocess("session_cycles(200, warmup=30)")
    print(f"200 cycles: RSS growth {report['growth'] / 2**20:+.2f} MiB")
    assert report["growth"] <= soak.SESSION_CYCLES_GROWTH_BOUND_BYTES, report


def test_column_scan_scratch_is_released_with_the_session():
    # H = 2**19: the former per-thread scratch (97 H floats) would stay at 194 MiB.
    report = soak_in_subprocess(f"scratch_release(height={2**19})")
    print(f"RSS growth after a tall column scan: {report['growth'] / 2**20:+.2f} MiB")
    assert report["growth"] <= soak.SCRATCH_RELEASE_BOUND_BYTES, report


def test_eight_threads_two_hundred_runs_are_bitwise_identical():
    report = soak.threaded_runs(threads=8, runs=200)
    assert report["errors"] == [], report["errors"]
    assert report["produced"] == 1600
    assert report["differing"] == 0


def test_threaded_runs_compute_the_reference():
    # The output the threads agree on is the scan itself, not a common wrong answer.
    feeds = soak.scan_inputs(2, 8, 4, 33, 41, seed=3)
    session = soak.custom_session(soak.scan_model_bytes("r2l", 5), None, threads=2)
    (out,) = session.run(None, feeds)
    tensors = [torch.from_numpy(feeds[name]) for name in ("x", "lam", "gl", "gm", "gr")]
    expected = gspn_ref.gspn_scan_ref(*tensors, direction="r2l", chunk=5)
    assert_close_scaled(torch.from_numpy(out), expected, torch.float32, 41, "r2l chunk 5")
