"""Run a saved TVM-compiled GSPN model with the TVM runtime alone.

An artifact saved by ``CompiledModel.save(path)`` (``gspn_tvm.relax_frontend``) is a folder:

    model.so         the Relax VM executable and every kernel, from ``export_library``
    params.bin       the model parameters (``tvm.runtime.save_param_dict``), passed after the inputs;
                     each is stored under ``"<position>:<name>"``
    signature.json   version 2: the inputs' names, shapes (ints, or names of dynamic dimensions),
                     dtypes and the lower bounds of the dynamic dimensions; the target, and for a CPU
                     build its x86-64 level and the CPU features it needs (``gspn_tvm.isa``); the
                     sha256 of ``model.so`` and ``params.bin``; each parameter's key, shape, dtype
                     and sha256, in the order the model takes them

:func:`load_artifact` checks before it loads anything: the signature's version and fields, that
this machine reports every CPU feature the artifact needs, and the sha256 of both files (a
truncated or corrupt ``model.so`` is never handed to the dynamic loader, which would kill the
process). After parsing ``params.bin`` it checks each parameter's key, shape, dtype and sha256
against the signature, so two same-shape parameters swapped are caught. Every failure is a
``ValueError`` naming the file and what differs.

This module imports only the standard library, numpy, ``tvm.runtime``, :mod:`gspn_tvm.isa` and
:mod:`gspn_tvm.threads` (standard library and ``tvm.runtime`` only): it works in a process started
with ``TVM_USE_RUNTIME_LIB=1`` (no compiler library) and without torch installed. Copied alone, keep
``isa.py`` and ``threads.py`` beside it. Runs use ``num_threads`` CPU threads (default: every CPU).
It is also the home of the input checks that the compile-side callable shares.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime import load_module
from tvm.runtime.params import load_param_dict_from_file
from tvm.runtime.vm import VirtualMachine

try:
    from . import isa, threads
except ImportError:  # this file was loaded on its own (``python runtime_loader.py``): the two are beside it
    import importlib.util as _importlib_util
    import sys as _sys

    def _sibling(name: str):
        spec = _importlib_util.spec_from_file_location(f"gspn_{name}", Path(__file__).with_name(f"{name}.py"))
        module = _importlib_util.module_from_spec(spec)
        _sys.modules.setdefault(f"gspn_{name}", module)
        spec.loader.exec_module(module)
        return module

    isa, threads = _sibling("isa"), _sibling("threads")

LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.bin"
SIGNATURE_FILE = "signature.json"
SIGNATURE_VERSION = 2
_SIGNATURE_FIELDS = ("device_type", "target", "cpu_level", "required_cpu_features", "inputs", "lower_bounds",
                     "params", "files")  # fmt: skip


def format_shape(shape: Sequence) -> str:
    """``(batch, 8, height, width)``: ints as numbers, dynamic dimensions by name."""
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def check_inputs(signature: dict, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> None:
    """Raise ``ValueError`` unless the given input ``shapes``/``dtypes`` fit the compiled ``signature``.

    A fixed dimension must match exactly; a dynamic one must be at least its lower bound, and every
    use of one dynamic dimension (by name, across inputs) must have the same size. The message names
    the compiled shape and the given one.
    """
    specs = signature["inputs"]
    if len(shapes) != len(specs):
        names = ", ".join(spec["name"] for spec in specs)
        raise ValueError(f"expected {len(specs)} input(s) ({names}); got {len(shapes)}")
    lower_bounds = signature.get("lower_bounds", {})
    bound_sizes: dict[str, tuple[int, str]] = {}
    for spec, shape, dtype in zip(specs, shapes, dtypes):
        name, compiled = spec["name"], spec["shape"]
        expected = f"{name}: the model was compiled for shape {format_shape(compiled)} {spec['dtype']}"
        given = f"got {format_shape(shape)} {dtype}"
        if dtype != spec["dtype"]:
            raise ValueError(f"{expected}; {given} (dtype differs)")
        if len(shape) != len(compiled):
            raise ValueError(f"{expected}; {given} (rank {len(shape)} instead of {len(compiled)})")
        for axis, (want, size) in enumerate(zip(compiled, shape)):
            if isinstance(want, int):
                if size != want:
                    raise ValueError(f"{expected}; {given} (dimension {axis} is fixed at {want})")
                continue
            minimum = lower_bounds.get(want, 1)
            if size < minimum:
                raise ValueError(f"{expected}; {given} (dimension {axis}, {want}, must be >= {minimum})")
            first = bound_sizes.setdefault(want, (size, name))
            if first[0] != size:
                raise ValueError(
                    f"{expected}; {given} (dimension {axis}, {want}, is {first[0]} in input {first[1]})"
                )


def device_for(device_type: str, index: int = 0):
    """The TVM device for a target kind name (``llvm`` or ``cpu``: CPU; ``cuda``: GPU ``index``)."""
    if device_type in ("llvm", "cpu", "c"):
        return tvm.cpu(index)
    if device_type == "cuda":
        return tvm.cuda(index)
    raise ValueError(f"device_type: expected 'cpu' or 'cuda'; got {device_type!r}")


class DeployedModel:
    """A loaded artifact: ``run(*arrays)`` on numpy arrays returns numpy array(s)."""

    def __init__(self, library, params: list, signature: dict, device, num_threads: int | None = None):
        self.signature = signature
        self.device = device
        #: CPU threads of TVM's pool for each run (default: every CPU; :mod:`gspn_tvm.threads`).
        self.num_threads = num_threads or os.cpu_count() or 1
        self._vm = VirtualMachine(library, device)
        self._main = self._vm["main"]
        self._params = params

    def run_tvm(self, *inputs):
        """Run on ``tvm.runtime.Tensor`` inputs already on the device (no checks, no copies)."""
        threads.use_threads(self.num_threads)
        return self._main(*inputs, *self._params)

    def run(self, *arrays: np.ndarray):
        """Outputs for numpy ``arrays`` (shapes as in the signature): one array or a tuple of arrays."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        check_inputs(self.signature, [a.shape for a in arrays], [str(a.dtype) for a in arrays])
        outputs = self.run_tvm(*(tvm.runtime.tensor(a, self.device) for a in arrays))
        return _to_numpy(outputs)


def _to_numpy(value):
    if hasattr(value, "numpy"):
        return value.numpy()
    return tuple(_to_numpy(item) for item in value)


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (artifact files and kernel cache entries)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(array: np.ndarray) -> str:
    """sha256 of a parameter's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def param_key(position: int, name: str) -> str:
    """The key of the parameter at ``position`` in ``params.bin``: the position anchors the order."""
    return f"{position}:{name}"


def read_signature(path: str | os.PathLike) -> dict:
    """The ``signature.json`` of the artifact folder ``path``; ValueError unless it is a readable version-2 signature."""
    file = Path(path) / SIGNATURE_FILE
    try:
        signature = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: missing; expected a folder written by CompiledModel.save") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{file}: not readable JSON ({error})") from None
    if not isinstance(signature, dict):
        raise ValueError(f"{file}: expected a JSON object; got {type(signature).__name__}")
    if signature.get("version") != SIGNATURE_VERSION:
        raise ValueError(
            f"{file}: artifact signature version {signature.get('version')!r}; this loader reads version "
            f"{SIGNATURE_VERSION} (with checksums and CPU features): save the model again with CompiledModel.save"
        )
    missing = [field for field in _SIGNATURE_FIELDS if field not in signature]
    if missing:
        raise ValueError(f"{file}: missing field(s) {', '.join(missing)}")
    _check_signature_types(signature, file)
    return signature


def _check_signature_types(signature: dict, file: Path) -> None:
    def fail(what: str):
        raise ValueError(f"{file}: {what}")

    inputs = signature["inputs"]
    if not isinstance(inputs, list) or not inputs:
        fail("'inputs' must be a non-empty list")
    for spec in inputs:
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("dtype"), str)
                and isinstance(spec.get("shape"), list)
                and all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                        for d in spec["shape"])):  # fmt: skip
            fail(f"malformed input entry {spec!r}: expected name, shape (ints >= 0 or names), dtype")
    bounds = signature["lower_bounds"]
    if not isinstance(bounds, dict) or not all(isinstance(v, int) for v in bounds.values()):
        fail("'lower_bounds' must map dimension names to ints")
    params = signature["params"]
    if not isinstance(params, list):
        fail("'params' must be a list")
    for entry in params:
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("sha256"), str) and isinstance(entry.get("shape"), list)
                and all(isinstance(d, int) for d in entry["shape"])):  # fmt: skip
            fail(f"malformed parameter entry {entry!r}: expected key, shape, dtype, sha256")
    files = signature["files"]
    if not isinstance(files, dict) or not all(isinstance(files.get(name), str) for name in (LIBRARY_FILE, PARAMS_FILE)):
        fail(f"'files' must give the sha256 of {LIBRARY_FILE} and {PARAMS_FILE}")
    features = signature["required_cpu_features"]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        fail("'required_cpu_features' must be a list of feature names")


def check_cpu_features(signature: dict, folder: Path) -> None:
    """ValueError unless this machine reports every CPU feature the artifact's code needs."""
    missing = isa.missing_features(signature["required_cpu_features"])
    if missing:
        level = signature.get("cpu_level") or "its target"
        try:
            here = isa.resolve_level() or "the generic CPU"
        except ValueError:  # a malformed GSPN_CPU_TARGET does not hide the real problem
            here = "a level this machine has"
        raise ValueError(
            f"{folder}: this artifact was compiled for {level} and needs CPU features this machine does not "
            f"report: {', '.join(missing)}. Running it would stop with an illegal instruction. Compile it "
            f"again for this machine's level, e.g. compile_model(..., target={{'kind': 'llvm', 'mcpu': '{here}'}})"
        )


def verify_file(folder: Path, name: str, signature: dict) -> None:
    """ValueError unless the sha256 of ``folder/name`` is the one the signature records."""
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; expected a folder written by CompiledModel.save")
    digest = sha256_of(file)
    if digest != signature["files"][name]:
        raise ValueError(
            f"{file}: its sha256 ({digest[:16]}..., {file.stat().st_size} bytes) is not the one {SIGNATURE_FILE} "
            "records; the file is truncated, corrupt or from another artifact. Save the model again."
        )


def check_params(named: dict, signature: dict, file: Path) -> list:
    """The parameters of ``named`` in the signature's order, each checked (key, shape, dtype, sha256)."""
    entries = signature["params"]
    expected_keys = [entry["key"] for entry in entries]
    if sorted(named) != sorted(expected_keys):
        raise ValueError(
            f"{file}: holds parameters {sorted(named)}; {SIGNATURE_FILE} lists {sorted(expected_keys)}"
        )
    params = []
    for position, entry in enumerate(entries):
        key = entry["key"]
        what = f"{file}: parameter {position} ({key})"
        if not key.startswith(f"{position}:"):
            raise ValueError(f"{what}: recorded at position {position} but keyed for another position; "
                             f"{SIGNATURE_FILE} lists the parameters out of order")  # fmt: skip
        tensor = named[key]
        shape, dtype = [int(d) for d in tensor.shape], str(tensor.dtype)
        if shape != entry["shape"] or dtype != entry["dtype"]:
            raise ValueError(
                f"{what}: {SIGNATURE_FILE} records shape {format_shape(entry['shape'])} {entry['dtype']}; "
                f"{PARAMS_FILE} holds {format_shape(shape)} {dtype}"
            )
        if tensor_sha256(tensor.numpy()) != entry["sha256"]:
            raise ValueError(f"{what}: its values are not the ones {SIGNATURE_FILE} records (parameters swapped or altered)")
        params.append(tensor)
    return params


def load_artifact(path: str | os.PathLike, device_index: int = 0, num_threads: int | None = None) -> DeployedModel:
    """Load the artifact folder ``path`` written by ``CompiledModel.save`` onto its target's device.

    Raises ValueError (naming the file) when the signature is malformed or of another version, when
    this machine lacks a CPU feature the artifact needs, when ``model.so`` or ``params.bin`` does
    not match its recorded sha256, or when a parameter's key, shape, dtype or values differ from
    the signature. Nothing is loaded before these checks pass.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; expected a folder written by CompiledModel.save")
    signature = read_signature(folder)
    device = device_for(signature["device_type"], device_index)
    check_cpu_features(signature, folder)
    verify_file(folder, LIBRARY_FILE, signature)
    verify_file(folder, PARAMS_FILE, signature)
    named = load_param_dict_from_file(str(folder / PARAMS_FILE))
    params = [p.copyto(device) for p in check_params(dict(named), signature, folder / PARAMS_FILE)]
    library = load_module(str(folder / LIBRARY_FILE))
    return DeployedModel(library, params, signature, device, num_threads)


def main(argv: Sequence[str] | None = None) -> int:
    """``python runtime_loader.py ARTIFACT IN.npy [IN.npy ...] --out OUT.npz``: run on saved inputs."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("artifact")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model = load_artifact(args.artifact)
    outputs = model.run(*(np.load(p) for p in args.inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    np.savez(args.out, *outputs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
