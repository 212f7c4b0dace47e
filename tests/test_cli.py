"""`gspn demo` (what `make demo` runs) completes and shows every capability with agreeing results;
the CLI silences only the named, known-harmless warnings."""

import logging
import re
import subprocess
import sys
import warnings

import torch

import export
import gspn.cli
from gspn_ref import GSPN, TinyGSPNClassifier

LEAFSPEC_MESSAGE = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."


def test_demo_runs_every_step(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gspn.cli", "demo", "--out", str(tmp_path)],  # what `gspn demo` runs
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in range(1, 8):
        assert f"== {step}." in out, f"demo step {step} missing:\n{out}"
    model = TinyGSPNClassifier(num_classes=10)  # the demo's model: one scan node per direction of each layer
    n_scans = sum(len(m.directions) for m in model.modules() if isinstance(m, GSPN))
    assert f"{n_scans} gspn.fused_scan nodes" in out
    diffs = [float(v) for v in re.findall(r"max \|[^|]+\| ([0-9.e+-]+)", out)]
    print(diffs)
    # export vs eager, ORT custom and portable vs torch, TVM kernels vs reference, Relax vs torch, runtime-only.
    assert len(diffs) == 8 and max(diffs) < 1e-4
    assert re.findall(r"same top-1 (\w+)", out) == ["True"] * 4
    assert "LeafSpec" not in result.stderr, result.stderr[-3000:]
    for name in ("heatmaps/affinity_panel.png", "tiny_classifier_custom.onnx", "tiny_classifier_portable.onnx",
                 "tiny_classifier_tvm/model.so"):  # fmt: skip
        assert (tmp_path / name).is_file(), name


def test_only_the_named_warnings_are_silenced():
    cli = gspn.cli
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli.quiet_known_warnings()
            warnings.warn_explicit(LEAFSPEC_MESSAGE, FutureWarning, "/usr/lib/python3.11/copyreg.py", 105, module="copyreg")
            warnings.warn_explicit("`isinstance(x, Other)` is deprecated", FutureWarning, "copyreg.py", 105, module="copyreg")
            warnings.warn_explicit(LEAFSPEC_MESSAGE, FutureWarning, "layer.py", 1, module="gspn_ref.layer")
            warnings.warn_explicit(LEAFSPEC_MESSAGE, UserWarning, "copyreg.py", 105, module="copyreg")
            warnings.warn_explicit("an API is deprecated", DeprecationWarning, "gspn_ref/layer.py", 1, module="gspn_ref.layer")
    finally:
        onnx_logger.setLevel(level)
    shown = [(w.category, str(w.message)) for w in caught]
    assert shown == [
        (FutureWarning, "`isinstance(x, Other)` is deprecated"),
        (FutureWarning, LEAFSPEC_MESSAGE),
        (UserWarning, LEAFSPEC_MESSAGE),
        (DeprecationWarning, "an API is deprecated"),
    ]


def test_the_named_warning_is_real_and_silenced(tmp_path):
    """The one named warning is what an ONNX export really emits (else the filter should go), and the filter hides it."""
    torch.manual_seed(0)
    layer = GSPN(4, d_proxy=2, directions=("t2b",)).eval()
    x = torch.randn(1, 4, 5, 6)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    try:
        with warnings.catch_warnings(record=True) as unfiltered:
            warnings.simplefilter("always")
            export.to_onnx(layer, (x,), tmp_path / "a.onnx")
        with warnings.catch_warnings(record=True) as filtered:
            warnings.simplefilter("always")
            gspn.cli.quiet_known_warnings()
            export.to_onnx(layer, (x,), tmp_path / "b.onnx")
    finally:
        onnx_logger.setLevel(level)
    leafspec = [w for w in unfiltered if "LeafSpec" in str(w.message)]
    assert leafspec and all(w.category is FutureWarning and w.filename.endswith("copyreg.py") for w in leafspec)
    assert not [w for w in filtered if "LeafSpec" in str(w.message)]
    # Nothing else was silenced.
    others = sorted(f"{w.category.__name__}: {w.message}" for w in unfiltered if "LeafSpec" not in str(w.message))
    assert sorted(f"{w.category.__name__}: {w.message}" for w in filtered) == others
