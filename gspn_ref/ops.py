"""The operator ``gspn::scan`` (and ``gspn::scan_backward``), registered once with ``torch.library``.

The reference is the default kernel for every device. Backends (``gspn_tvm``) add device kernels with
``scan_op.register_kernel(device)(fn)`` and switch them with ``scan_op.set_kernel_enabled(device, on)``;
callers of ``gspn_scan``, the ``GSPN`` layer, ``torch.compile`` and ``torch.export`` are unchanged.

Every kernel behind the operator, the fake (meta) kernels included, checks its arguments with
``gspn_ref.validation``, so ``torch.ops.gspn.scan`` called directly rejects bad input with the same
``ValueError``/``TypeError`` as ``gspn_scan``. (Arguments of the wrong Python type for the schema,
e.g. a float ``chunk`` or an int beyond 64 bits, are rejected earlier by torch's dispatcher.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import gspn_fused_scan_backward_ref, gspn_fused_scan_ref
from .scan import gspn_scan_backward_ref, gspn_scan_ref
from .validation import (
    validate_backward_args,
    validate_chunk,
    validate_direction,
    validate_fused_args,
    validate_like,
    validate_scan_args,
)


@torch.library.custom_op("gspn::scan", mutates_args=())
def scan_op(x: Tensor, lam: Tensor, gl: Tensor, gm: Tensor, gr: Tensor, direction: str, chunk: int) -> Tensor:
    """``h = gspn_scan(x, lam, gl, gm, gr, direction, chunk)``; shapes as in docs/operator.md ("The scan")."""
    return gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)


@torch.library.custom_op("gspn::scan_backward", mutates_args=())
def scan_backward_op(
    gh: Tensor, x: Tensor, lam: Tensor, gl: Tensor, gm: Tensor, gr: Tensor, h: Tensor, direction: str, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adjoint scan: ``(dx, dlam, dgl, dgm, dgr)`` shaped like ``(x, lam, gl, gm, gr)``."""
    return gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, chunk)


@torch.library.custom_op("gspn::fused_scan", mutates_args=())
def fused_scan_op(
    u: Tensor, lam: Tensor, al: Tensor, am: Tensor, ar: Tensor, gate: Tensor, skip: Tensor, direction: str, chunk: int
) -> Tensor:
    """``y = gspn_fused_scan(u, lam, al, am, ar, gate, skip, direction, chunk)`` (docs/operator.md, "The fused scan")."""
    return gspn_fused_scan_ref(u, lam, al, am, ar, gate, skip, direction, chunk)


@torch.library.custom_op("gspn::fused_scan_backward", mutates_args=())
def fused_scan_backward_op(
    gy: Tensor, u: Tensor, lam: Tensor, al: Tensor, am: Tensor, ar: Tensor, gate: Tensor, skip: Tensor,
    direction: str, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of the fused scan: ``(du, dlam, dal, dam, dar, dgate, dskip)`` shaped like its inputs."""
    return gspn_fused_scan_backward_ref(gy, u, lam, al, am, ar, gate, skip, direction, chunk)


def _check_shapes(x, lam, gl, gm, gr):
    torch._check(x.dim() == 4, lambda: f"x: expected 4-D (B, C, H, W); got {x.dim()}-D")
    for name, t in (("lam", lam), ("gl", gl), ("gm", gm), ("gr", gr)):
        torch._check(t.dim() == 4, lambda: f"{name}: expected 4-D; got {t.dim()}-D")
        torch._check(t.dtype == x.dtype, lambda: f"{name}: expected dtype {x.dtype}; got {t.dtype}")
    for d in range(4):
        torch._check(lam.shape[d] == x.shape[d], lambda: f"lam: expected shape {tuple(x.shape)}; got {tuple(lam.shape)}")
    for name, t in (("gl", gl), ("gm", gm), ("gr", gr)):
        for d in (0, 2, 3):
            torch._check(t.shape[d] == x.shape[d], lambda: f"{name}: expected (B, G, H, W) matching x; got {tuple(t.shape)}")
        torch._check(t.shape[1] == gl.shape[1], lambda: f"{name}: expected G = {gl.shape[1]}; got {t.shape[1]}")
    torch._check(x.shape[1] % gl.shape[1] == 0, lambda: f"gl: G = {gl.shape[1]} must divide C = {x.shape[1]}")


def _concrete(*tensors) -> bool:
    """True when every size is a plain int (meta tensors), False under symbolic tracing."""
    return all(isinstance(d, int) for t in tensors for d in t.shape)


@scan_op.register_fake
def _scan_fake(x: Tensor, lam: Tensor, gl: Tensor, gm: Tensor, gr: Tensor, direction: str, chunk: int) -> Tensor:
    if _concrete(x, lam, gl, gm, gr):
        validate_scan_args(x, lam, gl, gm, gr, direction, chunk)
    else:  # symbolic sizes: record the checks as guards instead of evaluating them
        _check_shapes(x, lam, gl, gm, gr)
        validate_direction(direction), validate_chunk(chunk)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@scan_backward_op.register_fake
def _scan_backward_fake(
    gh: Tensor, x: Tensor, lam: Tensor, gl: Tensor, gm: Tensor, gr: Tensor, h: Tensor, direction: str, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _concrete(gh, x, lam, gl, gm, gr, h):
        validate_scan_args(x, lam, gl, gm, gr, direction, chunk)
        validate_backward_args(gh, h, x)
    else:
        _check_shapes(x, lam, gl, gm, gr)
        torch._check(gh.shape == x.shape, lambda: f"gh: expected shape {tuple(x.shape)}; got {tuple(gh.shape)}")
        validate_direction(direction), validate_chunk(chunk)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, lam, gl, gm, gr))


def _check_like(x, **tensors):
    for name, t in tensors.items():
        torch._check(t.dim() == 4, lambda: f"{name}: expected 4-D; got {t.dim()}-D")
        torch._check(t.dtype == x.dtype, lambda: f"{name}: expected dtype {x.dtype}; got {t.dtype}")
        for d in range(4):
            torch._check(t.shape[d] == x.shape[d], lambda: f"{name}: expected shape {tuple(x.shape)}; got {tuple(t.shape)}")


@fused_scan_op.register_fake
def _fused_scan_fake(
    u: Tensor, lam: Tensor, al: Tensor, am: Tensor, ar: Tensor, gate: Tensor, skip: Tensor, direction: str, chunk: int
) -> Tensor:
    if _concrete(u, lam, al, am, ar, gate, skip):
        validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk)
    else:
        _check_shapes(u, lam, al, am, ar)
        _check_like(u, gate=gate, skip=skip)
        validate_direction(direction), validate_chunk(chunk)
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@fused_scan_backward_op.register_fake
def _fused_scan_backward_fake(
    gy: Tensor, u: Tensor, lam: Tensor, al: Tensor, am: Tensor, ar: Tensor, gate: Tensor, skip: Tensor,
    direction: str, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _concrete(gy, u, lam, al, am, ar, gate, skip):
        validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk)
        validate_like(u, "u", gy=gy)
    else:
        _check_shapes(u, lam, al, am, ar)
        _check_like(u, gate=gate, skip=skip, gy=gy)
        validate_direction(direction), validate_chunk(chunk)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, lam, al, am, ar, gate, skip))


def _setup_context(ctx, inputs, output):
    x, lam, gl, gm, gr, direction, chunk = inputs
    ctx.save_for_backward(x, lam, gl, gm, gr, output)
    ctx.direction, ctx.chunk = direction, chunk


def _backward(ctx, gh):
    x, lam, gl, gm, gr, h = ctx.saved_tensors
    grads = torch.ops.gspn.scan_backward(gh.contiguous(), x, lam, gl, gm, gr, h, ctx.direction, ctx.chunk)
    return (*grads, None, None)


scan_op.register_autograd(_backward, setup_context=_setup_context)


def _fused_setup_context(ctx, inputs, output):
    *tensors, direction, chunk = inputs
    ctx.save_for_backward(*tensors)
    ctx.direction, ctx.chunk = direction, chunk


def _fused_backward(ctx, gy):
    grads = torch.ops.gspn.fused_scan_backward(gy.contiguous(), *ctx.saved_tensors, ctx.direction, ctx.chunk)
    return (*grads, None, None)


fused_scan_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def gspn_scan(
    x: Tensor, lam: Tensor, gl: Tensor, gm: Tensor, gr: Tensor, direction: str = "t2b", chunk: int = 0
) -> Tensor:
    """Validated entry point to ``torch.ops.gspn.scan``; same contract as :func:`gspn_scan_ref`.

    Runs whichever kernel is registered for the device (the reference unless a backend is enabled).
    """
    validate_scan_args(x, lam, gl, gm, gr, direction, chunk)
    return torch.ops.gspn.scan(x, lam, gl, gm, gr, direction, chunk)


def gspn_fused_scan(
    u: Tensor, lam: Tensor, al: Tensor, am: Tensor, ar: Tensor, gate: Tensor, skip: Tensor,
    direction: str = "t2b", chunk: int = 0,
) -> Tensor:
    """Validated entry point to ``torch.ops.gspn.fused_scan``; same contract as
    :func:`gspn_ref.fused.gspn_fused_scan_ref`: ``gspn_scan(u, lam, normalize_weights(al, am, ar))
    * gate + u * skip`` in one pass. Differentiable in all seven tensors."""
    validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk)
    return torch.ops.gspn.fused_scan(u, lam, al, am, ar, gate, skip, direction, chunk)
