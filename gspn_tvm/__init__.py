"""gspn_tvm: TVM TensorIR kernels of the GSPN scan, registered as kernels of ``gspn::scan``.

Usage::

    import gspn_tvm
    gspn_tvm.enable()     # gspn_ref.gspn_scan, the GSPN layer, torch.compile now run TVM kernels
    gspn_tvm.disable()    # back to the reference kernels

Setting the environment variable ``GSPN_BACKEND=tvm`` before ``import gspn_tvm`` enables the
kernels at import. ``enable()`` registers kernels for ``"cpu"``, and for ``"cuda"`` when
``torch.cuda.is_available()``, on both ``gspn::scan`` and ``gspn::scan_backward``; ``gspn_scan_ref``
always runs the reference.

Compiled libraries are cached on disk (``$GSPN_CACHE_DIR``, default ``~/.cache/gspn/tvm``; see
:mod:`gspn_tvm.build`). The first use of a dtype on a device compiles its library (a few seconds);
later processes load it from the cache in milliseconds.

Layout: :mod:`gspn_tvm.compute` (TensorIR: what is computed), :mod:`gspn_tvm.schedules` (one
schedule per target: how), :mod:`gspn_tvm.build` (compile + cache), :mod:`gspn_tvm.kernels` (the
torch-facing kernels), :mod:`gspn_tvm.bench` (timings against the reference and the memory floor).
"""

from __future__ import annotations

import os

import torch

from gspn_ref import gspn_scan_backward_ref, gspn_scan_ref
from gspn_ref.ops import scan_backward_op, scan_op

from . import kernels
from .build import cache_root, load_scan_library

__all__ = ["cache_root", "devices", "disable", "enable", "is_enabled", "load_scan_library"]

_registered: set[str] = set()
_enabled: set[str] = set()


def devices() -> tuple[str, ...]:
    """Devices the TVM kernels serve in this process: ``("cpu",)`` plus ``"cuda"`` with a GPU."""
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


# torch's ``set_kernel_enabled`` is a context manager (scoped switching); enable()/disable() switch
# for the rest of the process, so the registered kernels consult ``_enabled`` and hand over to the
# reference while disabled.
def _forward_kernel(x, lam, gl, gm, gr, direction, chunk):
    if x.device.type in _enabled:
        return kernels.scan_forward(x, lam, gl, gm, gr, direction, chunk)
    return gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)


def _backward_kernel(gh, x, lam, gl, gm, gr, h, direction, chunk):
    if x.device.type in _enabled:
        return kernels.scan_backward(gh, x, lam, gl, gm, gr, h, direction, chunk)
    return gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, chunk)


def enable() -> None:
    """Run ``gspn::scan`` and ``gspn::scan_backward`` with TVM kernels on every served device."""
    for device in devices():
        if device not in _registered:
            scan_op.register_kernel(device)(_forward_kernel)
            scan_backward_op.register_kernel(device)(_backward_kernel)
            _registered.add(device)
        _enabled.add(device)


def disable() -> None:
    """Return ``gspn::scan`` and ``gspn::scan_backward`` to the reference kernels."""
    _enabled.clear()


def is_enabled(device: str = "cpu") -> bool:
    """True while the TVM kernels serve ``device``."""
    return device in _enabled


if os.environ.get("GSPN_BACKEND", "").lower() == "tvm":
    enable()
