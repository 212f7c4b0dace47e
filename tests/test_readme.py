"""The README's usage snippet runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_scaled, naive_scan_float64, scan_tolerance

import gspn_ref

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_snippets_run(tmp_path, monkeypatch):
    """Every python block of the README, in order, in one namespace (as a reader runs them)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "README.md lost its python snippets"
    monkeypatch.chdir(tmp_path)  # the snippets write ONNX files to the working folder
    namespace = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
        # What the snippets computed, against oracles that share no code with the snippets' own checks.
        x, lam, gl, gm, gr, h = (namespace[n] for n in ("x", "lam", "gl", "gm", "gr", "h"))
        n_lines = x.shape[3]  # the first snippet scans l2r: one line per column
        assert_close_scaled(h, naive_scan_float64(x, lam, gl, gm, gr, "l2r"), torch.float32, n_lines, "README scan")
        fused_args = [namespace[n].double() for n in ("u", "lam_k", "al", "am", "ar", "gate", "skip")]
        y64 = gspn_ref.gspn_fused_scan_ref(*fused_args, "t2b")
        assert_close_scaled(namespace["y_fused"], y64, torch.float32, fused_args[0].shape[2], "README fused scan")
        with torch.no_grad():
            expected = namespace["model"](namespace["images"]).numpy()
        portable = namespace["portable"]  # stock ONNX Runtime on the portable export
        assert portable.shape == expected.shape
        assert abs(portable - expected).max() <= 1e-4 * max(1.0, abs(expected).max()), "portable ONNX logits differ"
    finally:
        import gspn_tvm

        gspn_tvm.disable()


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


QUICKSTART_RUNNER = """
import runpy, sys, torch
if sys.argv[3] == "tvm":
    import gspn_tvm
    gspn_tvm.enable()
names = ("x", "lam", "gl", "gm", "gr", "h")
namespace = runpy.run_path(sys.argv[1], run_name="__main__")
torch.save({n: namespace[n].detach() for n in names}, sys.argv[2])
"""


@pytest.mark.parametrize("kernels", ["reference", "tvm"])
def test_quickstart_example_runs(tmp_path, kernels):
    """examples/quickstart.py runs; its scan equals SPEC section 2 evaluated independently, and the
    difference it prints (the operator's kernel against the reference) is within float32 tolerance."""
    script = README.parent / "examples" / "quickstart.py"
    saved = tmp_path / "scan.pt"
    result = subprocess.run([sys.executable, "-c", QUICKSTART_RUNNER, str(script), str(saved), kernels],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "block output (2, 16, 20, 12)" in result.stdout  # the block is shape-preserving on its (2, 16, 20, 12) input
    t = torch.load(saved)
    direction, n_lines = "b2t", t["x"].shape[2]  # the quickstart scans b2t: one line per row
    expected = naive_scan_float64(t["x"], t["lam"], t["gl"], t["gm"], t["gr"], direction)
    assert_close_scaled(t["h"], expected, torch.float32, n_lines, "quickstart scan vs SPEC recurrence")
    printed = re.findall(r"scan vs reference max \|diff\|: (\S+)", result.stdout)
    assert len(printed) == 1, result.stdout
    bound = 2 * scan_tolerance(torch.float32, n_lines) * expected.abs().max().item()
    assert 0.0 <= float(printed[0]) <= bound, f"printed max |diff| {printed[0]} > float32 bound {bound:.3e}"
