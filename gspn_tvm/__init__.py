"""gspn_tvm: TVM TensorIR kernels of the GSPN scan, registered as kernels of ``gspn::scan``.

Usage::

    import gspn_tvm
    gspn_tvm.enable()     # gspn_ref.gspn_scan, the GSPN layer, torch.compile now run TVM kernels
    gspn_tvm.disable()    # back to the reference kernels
    with gspn_tvm.enabled():   # on inside the block only; the previous state comes back after it
        ...

Setting the environment variable ``GSPN_BACKEND=tvm`` before ``import gspn_tvm`` enables the
kernels at import. ``enable()`` registers kernels for ``"cpu"``, and for ``"cuda"`` when
``torch.cuda.is_available()``, on ``gspn::scan``, ``gspn::scan_backward``, ``gspn::fused_scan`` and
``gspn::fused_scan_backward`` (one switch for all four); ``gspn_scan_ref`` always runs the reference.

Compiled libraries are cached on disk (``$GSPN_CACHE_DIR``, default ``~/.cache/gspn/tvm``; see
:mod:`gspn_tvm.build`). The first use of a dtype on a device compiles its library (a few seconds);
later processes load it from the cache in milliseconds.

Layout: :mod:`gspn_tvm.compute` (TensorIR: what is computed), :mod:`gspn_tvm.schedules` (one
schedule per target: how), :mod:`gspn_tvm.build` (compile + cache), :mod:`gspn_tvm.kernels` (the
torch-facing kernels), :mod:`gspn_tvm.registration` (``enable``/``disable``/``enabled``),
:mod:`gspn_tvm.isa` (the CPU target, from the features the OS reports). Whole models: :mod:`gspn_tvm.relax_frontend`
(``compile_model``, ``compile_onnx``: torch.export or ONNX -> TVM Relax, with the scan and the
fused scan lowered to this package's TensorIR) and :mod:`gspn_tvm.runtime_loader` (runs a saved artifact with the TVM
runtime alone). Names are imported lazily, so ``gspn_tvm.runtime_loader`` loads neither torch nor
the TVM compiler.
"""

from __future__ import annotations

import importlib
import os

_LAZY = {
    "enable": "registration",
    "disable": "registration",
    "is_enabled": "registration",
    "enabled": "registration",
    "devices": "registration",
    "cache_root": "build",
    "load_scan_library": "build",
    "compile_model": "relax_frontend",
    "compile_onnx": "relax_frontend",
    "CompiledModel": "relax_frontend",
    "load_artifact": "runtime_loader",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gspn_tvm' has no attribute {name!r}")


if os.environ.get("GSPN_BACKEND", "").lower() == "tvm":
    from .registration import enable

    enable()
