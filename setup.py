"""Build step of the package: the ONNX Runtime custom-operator library, compiled when the package is
built, ships inside it (``export/lib/libgspn_ortops.so``). Everything else is in pyproject.toml.

An editable install builds nothing here: in a source checkout the library is built in place by
``python -m export.build`` (``make setup``), and ``export.library_path()`` rebuilds it when its
sources change.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_builder():
    """``export/build.py`` loaded on its own (the package's ``__init__`` imports torch and onnx,
    which a build environment need not have)."""
    sys.path.insert(0, str(ROOT))  # export/build.py imports gspn_tvm.isa (standard library only)
    spec = importlib.util.spec_from_file_location("_gspn_export_build", ROOT / "export" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        builder = _load_builder()
        try:
            path = builder.build_library(dest=Path(self.build_lib) / "export" / "lib", verbose=True)
        except builder.BuildError as error:
            raise SystemExit(f"error: building the ONNX Runtime custom-operator library failed: {error}") from None
        print(f"built {path}")


setup(cmdclass={"build_py": BuildPyWithLibrary})
