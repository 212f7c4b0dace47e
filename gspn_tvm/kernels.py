"""TVM kernels of ``gspn::scan`` and ``gspn::scan_backward`` for the devices TVM serves.

Each kernel first checks its arguments with ``gspn_ref.validation`` (the checks of the reference,
O(1) in the sizes), so a kernel reached directly (``torch.ops.gspn.scan`` with the TVM kernels
enabled, or these functions) never hands the compiled code a shape it would misread. It then makes
the inputs contiguous (a copy only for non-contiguous, expanded or channels-last inputs), allocates
the outputs and passes everything to the compiled library through DLPack. Indices are 64-bit, so
element counts beyond 2**31 are supported. float64 has no compiled kernel: it runs the reference
(float64 is for gradient checks). Devices other than those TVM serves (``cpu``, ``cuda``; e.g.
``meta``) are rejected with a ``ValueError``.

Threads: every CPU call first sizes the TVM runtime's thread pool to ``torch.get_num_threads()``
(:func:`gspn_tvm.threads.use_threads`; a no-op while torch's count equals the count last applied in
the calling thread), so the kernels run on as many threads as torch, not on TVM's own default (half
the hardware threads: one on a 2-core machine). ``torch.set_num_threads`` changes both.
"""

from __future__ import annotations

import logging

import torch

from gspn_ref import gspn_scan_backward_ref, gspn_scan_ref
from gspn_ref.directions import line_count, line_length
from gspn_ref.validation import validate_backward_args, validate_scan_args

from . import build, compute, threads
from .schedules import cuda as cuda_schedule

logger = logging.getLogger(__name__)

_TORCH_TO_TVM = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_libraries: dict[tuple[str, str], object] = {}

_warned_fallbacks: set[str] = set()


def library(device: str, dtype: torch.dtype):
    """The compiled scan library for ``device`` ("cpu"/"cuda") and ``dtype``, loaded once per process."""
    key = (device, _TORCH_TO_TVM[dtype])
    if key not in _libraries:
        _libraries[key] = build.load_scan_library(*key)
    return _libraries[key]


def has_kernel(x: torch.Tensor, gl: torch.Tensor, direction: str, backward: bool = False) -> bool:
    """True when a compiled kernel serves these inputs (else the reference runs)."""
    if x.dtype not in _TORCH_TO_TVM:
        return False
    if backward and x.device.type == "cuda":
        length = line_length(direction, x.shape[2], x.shape[3])
        if not cuda_schedule.backward_fits(x.shape[1], gl.shape[1], length):
            _warn_once("cuda-backward-shared", "gspn_tvm: the CUDA adjoint of C=%d, G=%d, lines of %d needs %d bytes of "
                       "shared memory (limit %d): the reference adjoint runs for such shapes",
                       x.shape[1], gl.shape[1], length,
                       cuda_schedule.backward_shared_bytes(x.shape[1], gl.shape[1], length),
                       cuda_schedule.SHARED_LIMIT_BYTES)  # fmt: skip
            return False
    return True


def _warn_once(key: str, message: str, *args) -> None:
    """Log a fallback to the reference once per process and kind."""
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        logger.warning(message, *args)


def _served_device(x: torch.Tensor) -> None:
    if x.device.type not in build.SCHEDULES:
        raise ValueError(f"x: expected a tensor on one of {sorted(build.SCHEDULES)} for the TVM kernels; got device {x.device}")


def _kernel_chunk(chunk: int, direction: str, x: torch.Tensor) -> int:
    """``chunk`` for the compiled code: any ``chunk >= L`` (line count) restarts only at ``s = 0``,
    exactly like ``chunk = 0``, so it is passed as 0 (and always fits the kernel's int64)."""
    return 0 if chunk >= line_count(direction, x.shape[2], x.shape[3]) else chunk


def _compiled(name: str, x: torch.Tensor):
    """The compiled function ``name`` for ``x``'s device and dtype; on CPU, TVM's pool sized to torch's."""
    if x.device.type == "cpu":
        threads.use_threads(torch.get_num_threads())
    return library(x.device.type, x.dtype)[name]


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def scan_forward(x, lam, gl, gm, gr, direction: str, chunk: int) -> torch.Tensor:
    """``h`` (B, C, H, W) from ``x, lam`` (B, C, H, W) and ``gl, gm, gr`` (B, G, H, W).

    Raises ``TypeError``/``ValueError`` naming the argument for invalid input (see
    :func:`gspn_ref.validate_scan_args`) and for a device TVM does not serve.
    """
    validate_scan_args(x, lam, gl, gm, gr, direction, chunk)
    _served_device(x)
    if not has_kernel(x, gl, direction):
        return gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)
    x, lam, gl, gm, gr = (_dense(t) for t in (x, lam, gl, gm, gr))
    h = torch.empty_like(x)
    _compiled(compute.forward_name(direction), x)(x, lam, gl, gm, gr, h, _kernel_chunk(chunk, direction, x))
    return h


def scan_backward(gh, x, lam, gl, gm, gr, h, direction: str, chunk: int):
    """``(dx, dlam, dgl, dgm, dgr)`` shaped like ``(x, lam, gl, gm, gr)``; ``h`` is the forward output.

    Validates like :func:`scan_forward`, plus ``gh`` and ``h`` shaped, typed and placed like ``x``.
    """
    validate_scan_args(x, lam, gl, gm, gr, direction, chunk)
    validate_backward_args(gh, h, x)
    _served_device(x)
    if not has_kernel(x, gl, direction, backward=True):
        return gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, chunk)
    gh, x, lam, gl, gm, gr, h = (_dense(t) for t in (gh, x, lam, gl, gm, gr, h))
    grads = tuple(torch.empty_like(t) for t in (x, lam, gl, gm, gr))
    kernel = _compiled(compute.backward_name(direction), x)
    kernel(gh, x, lam, gl, gm, gr, h, *grads, _kernel_chunk(chunk, direction, x))
    return grads
