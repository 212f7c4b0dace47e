"""Registration of the TVM kernels on ``gspn::scan`` and ``gspn::scan_backward`` (see ``gspn_tvm``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gspn_ref import gspn_scan_backward_ref, gspn_scan_ref
from gspn_ref.ops import scan_backward_op, scan_op

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

