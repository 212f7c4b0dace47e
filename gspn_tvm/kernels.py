"""TVM kernels of ``gspn::scan``, ``gspn::scan_backward``, ``gspn::fused_scan`` and
``gspn::fused_scan_backward`` for the devices TVM serves.

Each kernel first checks its arguments with ``gspn_ref.validation`` (the checks of the reference,
O(1) in the sizes), so a kernel reached directly (``torch.ops.gspn.scan`` with the TVM kernels
enabled, or these functions) never hands the compiled code a shape it would misread. It then makes
the inputs contiguous (a copy only for non-contiguous, expanded or channels-last inputs), allocates
the outputs (large CPU ones on huge pages: :mod:`gspn_tvm.pages`) and passes everything to the
compiled library through DLPack. Indices are 64-bit, so
element counts beyond 2**31 are supported. float64 has no compiled kernel: it runs the reference
(float64 is for gradient checks).

The fused forward is one compiled kernel per direction (the ``"fused"`` library of
:mod:`gspn_tvm.build`). The fused adjoint is composed of the scan kernels: the weights are recomputed
in torch in float32 (:func:`gspn_ref.normalize_weights`), ``h`` by the TVM forward scan and the
scan's adjoint by the TVM adjoint on ``gy * gate``, all in float32 whatever the input dtype (weights
and ``h`` are never rounded to it); the normalization's adjoint and the gate and skip terms are torch
elementwise operations, and every gradient is rounded once at the end. Devices other than those TVM serves (``cpu``, ``cuda``; e.g.
``meta``) are rejected with a ``ValueError``.

Threads: every CPU call first sizes the TVM runtime's thread pool to ``torch.get_num_threads()``
(:func:`gspn_tvm.threads.use_threads`; a no-op while torch's count equals the count last applied in
the calling thread), so the kernels run on as many threads as torch, not on TVM's own default (half
the hardware threads: one on a 2-core machine). ``torch.set_num_threads`` changes both.
"""

from __future__ import annotations

import logging

import torch

from gspn_ref import gspn_fused_scan_backward_ref, gspn_fused_scan_ref, gspn_scan_backward_ref, gspn_scan_ref
from gspn_ref.directions import line_count, line_length
from gspn_ref.normalize import normalize_weights, normalize_weights_backward
from gspn_ref.validation import validate_backward_args, validate_fused_args, validate_like, validate_scan_args

from . import build, compute, pages, threads
from .schedules import cpu as cpu_schedule
from .schedules import cuda as cuda_schedule

logger = logging.getLogger(__name__)

_TORCH_TO_TVM = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_libraries: dict[tuple[str, str, str], object] = {}

_warned_fallbacks: set[str] = set()


def library(device: str, dtype: torch.dtype, kind: str = "scan"):
    """The compiled ``kind`` library (``"scan"`` or ``"fused"``, see :mod:`gspn_tvm.build`) for
    ``device`` ("cpu"/"cuda") and ``dtype``, loaded once per process."""
    key = (device, _TORCH_TO_TVM[dtype], kind)
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


def _compiled(name: str, x: torch.Tensor, kind: str = "scan"):
    """The compiled function ``name`` for ``x``'s device and dtype; on CPU, TVM's pool sized to torch's."""
    if x.device.type == "cpu":
        threads.use_threads(torch.get_num_threads())
    return library(x.device.type, x.dtype, kind)[name]


def _forward_symbol(symbol: str, direction: str, x: torch.Tensor) -> str:
    """``symbol``, or the variant that serves ``x``: on CUDA by line length
    (:func:`cuda_schedule.forward_symbol`), on CPU the lane kernel for small planes
    (:func:`cpu_schedule.lanes_serve`)."""
    if x.device.type == "cuda":
        return cuda_schedule.forward_symbol(symbol, direction, x.shape[2], x.shape[3])
    if cpu_schedule.lanes_serve(direction, *x.shape[1:]):
        return compute.lanes_name(symbol)
    return symbol


def _backward_symbol(direction: str, x: torch.Tensor, gl: torch.Tensor) -> str:
    """The adjoint for ``x``: on CPU the lane adjoint where it serves (small planes, one weight group
    per channel: :func:`cpu_schedule.backward_lanes_serve`), else the plane adjoint."""
    symbol = compute.backward_name(direction)
    if x.device.type == "cpu" and cpu_schedule.backward_lanes_serve(direction, x.shape[1], gl.shape[1], *x.shape[2:]):
        return compute.lanes_name(symbol)
    return symbol


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
    h = pages.empty_like(x)
    kernel = _compiled(_forward_symbol(compute.forward_name(direction), direction, x), x)
    kernel(x, lam, gl, gm, gr, h, _kernel_chunk(chunk, direction, x))
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
    grads = tuple(pages.empty_like(t) for t in (x, lam, gl, gm, gr))
    kernel = _compiled(_backward_symbol(direction, x, gl), x)
    kernel(gh, x, lam, gl, gm, gr, h, *grads, _kernel_chunk(chunk, direction, x))
    return grads


def fused_scan_forward(u, lam, al, am, ar, gate, skip, direction: str, chunk: int) -> torch.Tensor:
    """``y`` (B, C, H, W) of the fused scan from ``u, lam, gate, skip`` (B, C, H, W) and the weight
    logits ``al, am, ar`` (B, G, H, W): one compiled pass (float64: the reference).

    Raises ``TypeError``/``ValueError`` naming the argument for invalid input (see
    :func:`gspn_ref.validation.validate_fused_args`) and for a device TVM does not serve.
    """
    validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk)
    _served_device(u)
    if u.dtype not in _TORCH_TO_TVM:
        return gspn_fused_scan_ref(u, lam, al, am, ar, gate, skip, direction, chunk)
    if u.device.type == "cuda" and cuda_schedule.fused_runs_composed(direction, u.shape[2], u.shape[3]):
        return fused_scan_composed(u, lam, al, am, ar, gate, skip, direction, chunk)
    inputs = tuple(_dense(t) for t in (u, lam, al, am, ar, gate, skip))
    y = pages.empty_like(inputs[0])
    kernel = _compiled(_forward_symbol(compute.fused_forward_name(direction), direction, y), y, "fused")
    kernel(*inputs, y, _kernel_chunk(chunk, direction, y))
    return y


def fused_scan_composed(u, lam, al, am, ar, gate, skip, direction: str, chunk: int) -> torch.Tensor:
    """The fused scan as torch's weight normalization, the compiled scan and torch's gate and skip,
    all in float32 and rounded once at the end (the fused scan's contract); for the shapes where
    that beats the fused kernel (:func:`gspn_tvm.schedules.cuda.fused_runs_composed`)."""
    f32 = torch.float32
    u_, lam_, al_, am_, ar_, gate_, skip_ = (_dense(t).to(f32) for t in (u, lam, al, am, ar, gate, skip))
    h = scan_forward(u_, lam_, *normalize_weights(al_, am_, ar_, direction), direction, chunk)
    return h.mul_(gate_).add_(u_ * skip_).to(u.dtype)


def fused_scan_backward(gy, u, lam, al, am, ar, gate, skip, direction: str, chunk: int):
    """``(du, dlam, dal, dam, dar, dgate, dskip)`` shaped and typed like ``(u, lam, al, am, ar, gate,
    skip)``, for the upstream gradient ``gy`` (B, C, H, W): the TVM scan kernels in float32 between
    torch's normalization and its adjoint (see the module docstring; float64: the reference).

    Validates like :func:`fused_scan_forward`, plus ``gy`` shaped, typed and placed like ``u``.
    """
    validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk)
    validate_like(u, "u", gy=gy)
    _served_device(u)
    if u.dtype not in _TORCH_TO_TVM:
        return gspn_fused_scan_backward_ref(gy, u, lam, al, am, ar, gate, skip, direction, chunk)
    f32 = torch.float32
    gy_, u_, lam_, al_, am_, ar_, gate_, skip_ = (_dense(t).to(f32) for t in (gy, u, lam, al, am, ar, gate, skip))
    weights = normalize_weights(al_, am_, ar_, direction)
    h = scan_forward(u_, lam_, *weights, direction, chunk)
    du, dlam, dgl, dgm, dgr = scan_backward(gy_ * gate_, u_, lam_, *weights, h, direction, chunk)
    dal, dam, dar = normalize_weights_backward(dgl, dgm, dgr, al_, am_, ar_, direction)
    grads = (du.add_(gy_ * skip_), dlam, dal, dam, dar, gy_ * h, gy_ * u_)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (u, lam, al, am, ar, gate, skip)))
