"""Registration of the TVM kernels on ``gspn::scan``, ``gspn::scan_backward``, ``gspn::fused_scan``
and ``gspn::fused_scan_backward`` (see ``gspn_tvm``); one switch for all four."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gspn_ref import gspn_fused_scan_backward_ref, gspn_fused_scan_ref, gspn_scan_backward_ref, gspn_scan_ref
from gspn_ref.ops import fused_scan_backward_op, fused_scan_op, scan_backward_op, scan_op

from . import kernels

_registered: set[str] = set()
_enabled: set[str] = set()


def devices() -> tuple[str, ...]:
    """Devices the TVM kernels serve in this process: ``("cpu",)`` plus ``"cuda"`` with a GPU."""
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


# torch's ``set_kernel_enabled`` is a context manager (scoped switching); enable()/disable() switch
# for the rest of the process, so the registered kernels consult ``_enabled`` and hand over to the
# reference while disabled. Both paths validate their arguments (``kernels.scan_forward`` and the
# reference call ``gspn_ref.validation``), so ``torch.ops.gspn.scan`` called directly is checked.
def _forward_kernel(x, lam, gl, gm, gr, direction, chunk):
    if x.device.type in _enabled:
        return kernels.scan_forward(x, lam, gl, gm, gr, direction, chunk)
    return gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)


def _backward_kernel(gh, x, lam, gl, gm, gr, h, direction, chunk):
    if x.device.type in _enabled:
        return kernels.scan_backward(gh, x, lam, gl, gm, gr, h, direction, chunk)
    return gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, chunk)


def _fused_forward_kernel(u, lam, al, am, ar, gate, skip, direction, chunk):
    if u.device.type in _enabled:
        return kernels.fused_scan_forward(u, lam, al, am, ar, gate, skip, direction, chunk)
    return gspn_fused_scan_ref(u, lam, al, am, ar, gate, skip, direction, chunk)


def _fused_backward_kernel(gy, u, lam, al, am, ar, gate, skip, direction, chunk):
    if u.device.type in _enabled:
        return kernels.fused_scan_backward(gy, u, lam, al, am, ar, gate, skip, direction, chunk)
    return gspn_fused_scan_backward_ref(gy, u, lam, al, am, ar, gate, skip, direction, chunk)


def enable() -> None:
    """Run ``gspn::scan``, ``gspn::fused_scan`` and their adjoints with TVM kernels on every served device."""
    for device in devices():
        if device not in _registered:
            scan_op.register_kernel(device)(_forward_kernel)
            scan_backward_op.register_kernel(device)(_backward_kernel)
            fused_scan_op.register_kernel(device)(_fused_forward_kernel)
            fused_scan_backward_op.register_kernel(device)(_fused_backward_kernel)
            _registered.add(device)
        _enabled.add(device)


def disable() -> None:
    """Return the four operators to the reference kernels."""
    _enabled.clear()


def is_enabled(device: str = "cpu") -> bool:
    """True while the TVM kernels serve ``device``."""
    return device in _enabled


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Context manager: the TVM kernels on (``on=True``) or off inside the block; the state before
    the block (on or off, per device) is restored on exit, also when the block raises."""
    before = set(_enabled)
    if on:
        enable()
    else:
        disable()
    try:
        yield
    finally:
        _enabled.clear()
        _enabled.update(before)

