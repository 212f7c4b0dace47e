"""The packages form layers: each imports only the layers below it, never one above (no cycles).

    gspn_ref  <  gspn_tvm  <  export  <  gspn

Each package and every one of its modules is imported in a fresh interpreter in which the
packages above it cannot be imported; a module that reaches upward fails with ImportError.
"""

import subprocess
import sys
import textwrap

import pytest

LAYERS = ("gspn_ref", "gspn_tvm", "export", "gspn")

_PROBE = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    package, blocked = sys.argv[1], set(sys.argv[2:])

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} is above {package} and must not be imported by it")
            return None

    sys.meta_path.insert(0, Block())
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")
                         if ".tests" not in m.name]
    for name in names:
        importlib.import_module(name)
    print(len(names), "modules")
    """
)


@pytest.mark.parametrize("level", range(len(LAYERS)), ids=LAYERS)
def test_package_imports_only_layers_below(level):
    package, above = LAYERS[level], LAYERS[level + 1:]
    result = subprocess.run([sys.executable, "-c", _PROBE, package, *above], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0, f"{package} imports a package above it:\n{result.stderr[-3000:]}"


def test_probe_catches_an_upward_import():
    """The probe itself can fail: blocking gspn_ref makes importing gspn_tvm's kernels fail."""
    result = subprocess.run([sys.executable, "-c", _PROBE, "gspn_tvm", "gspn_ref"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode != 0 and "must not be imported" in result.stderr


def _imported_packages(path) -> set[str]:
    """Top-level package names imported anywhere in the file (module level or inside functions)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("level", range(len(LAYERS)), ids=LAYERS)
def test_no_deferred_upward_import(level):
    """Imports inside functions count too: the source of each package names no package above it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / LAYERS[level]
    above = set(LAYERS[level + 1:])
    offenders = {str(p.relative_to(root.parent)): sorted(_imported_packages(p) & above) for p in root.rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{LAYERS[level]} imports packages above it: {offenders}"
