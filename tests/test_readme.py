"""The README's usage snippet runs as written."""

import re
from pathlib import Path

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
    finally:
        import gspn_tvm

        gspn_tvm.disable()


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_quickstart_example_runs():
    import subprocess
    import sys

    script = README.parent / "examples" / "quickstart.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "scan vs reference max |diff|: 0.0" in result.stdout
