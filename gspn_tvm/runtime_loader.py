"""Run a saved TVM-compiled GSPN model with the TVM runtime alone.

An artifact saved by ``CompiledModel.save(path)`` (``gspn_tvm.relax_frontend``) is a folder:

    model.so         the Relax VM executable and every kernel, from ``export_library``
    params.bin       the model parameters (``tvm.runtime.save_param_dict``), passed after the inputs
    signature.json   the inputs' names, shapes (ints, or names of dynamic dimensions), dtypes and
                     the lower bounds of the dynamic dimensions

This module imports only the standard library, numpy and ``tvm.runtime``: it works in a process
started with ``TVM_USE_RUNTIME_LIB=1`` (no compiler library) and without torch installed. It is
also the home of the input checks that the compile-side callable shares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime import load_module
from tvm.runtime.params import load_param_dict_from_file
from tvm.runtime.vm import VirtualMachine

LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.bin"
SIGNATURE_FILE = "signature.json"
SIGNATURE_VERSION = 1


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

    def __init__(self, library, params: list, signature: dict, device):
        self.signature = signature
        self.device = device
        self._vm = VirtualMachine(library, device)
        self._main = self._vm["main"]
        self._params = params

    def run_tvm(self, *inputs):
        """Run on ``tvm.runtime.Tensor`` inputs already on the device (no checks, no copies)."""
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


def read_signature(path: str | os.PathLike) -> dict:
    """The ``signature.json`` of the artifact folder ``path``."""
    signature = json.loads((Path(path) / SIGNATURE_FILE).read_text())
    if signature.get("version") != SIGNATURE_VERSION:
        raise ValueError(
            f"{path}: artifact signature version {signature.get('version')!r}; "
            f"this loader reads version {SIGNATURE_VERSION}"
        )
    return signature


def load_artifact(path: str | os.PathLike, device_index: int = 0) -> DeployedModel:
    """Load the artifact folder ``path`` written by ``CompiledModel.save`` onto its target's device."""
    folder = Path(path)
    if not (folder / LIBRARY_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {LIBRARY_FILE}; expected a folder written by CompiledModel.save")
    signature = read_signature(folder)
    device = device_for(signature["device_type"], device_index)
    library = load_module(str(folder / LIBRARY_FILE))
    named = load_param_dict_from_file(str(folder / PARAMS_FILE))
    params = [named[name].copyto(device) for name in signature["param_order"]]
    return DeployedModel(library, params, signature, device)


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
