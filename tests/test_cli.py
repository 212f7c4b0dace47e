"""`gspn demo` (what `make demo` runs) completes and shows every capability with agreeing results."""

import re
import subprocess
import sys


def test_demo_runs_every_step(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "export.cli", "demo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in range(1, 7):
        assert f"== {step}." in out, f"demo step {step} missing:\n{out}"
    assert "8 gspn.scan nodes" in out
    diffs = [float(v) for v in re.findall(r"max \|[^|]+\| ([0-9.e+-]+)", out)]
    print(diffs)
    assert len(diffs) >= 5 and max(diffs) < 1e-4
    for name in ("heatmaps/affinity_panel.png", "tiny_classifier_custom.onnx", "tiny_classifier_portable.onnx",
                 "tiny_classifier_tvm/model.so"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
