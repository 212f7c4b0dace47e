"""The ONNX Runtime library ships in the wheel, and an installed package only finds it."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_the_library_and_library_path_finds_it(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gspn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "export/lib/libgspn_ortops.so" in names
        assert "gspn/cli.py" in names and "gspn_ref/data/official_l2r_vectors.npz" in names
        archive.extractall(tmp_path / "site")
    # The unpacked wheel as the only copy of the project on the path: library_path finds the
    # packaged library (no sources, no build), and a session runs the operator with it.
    probe = (
        "import export, torch; from gspn_ref import gspn_scan_ref, normalize_weights;"
        "p = export.library_path(); print(p);"
        "x, lam = torch.randn(2, 1, 2, 5, 6); w = normalize_weights(*torch.randn(3, 1, 1, 5, 6), 'l2r');"
        "s = export.session(export.scan_model('l2r'));"
        "h = s.run(None, export.scan_feeds(x, lam, *w))[0];"
        "print(float((torch.from_numpy(h) - gspn_scan_ref(x, lam, *w, 'l2r')).abs().max()))"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    path, diff = run.stdout.split()
    assert Path(path) == tmp_path / "site" / "export" / "lib" / "libgspn_ortops.so"
    assert float(diff) < 1e-5
