"""Argument checks at the boundary of the operator, the one definition every kernel calls.

``gspn_scan``, the reference kernels behind ``torch.ops.gspn.scan`` / ``scan_backward`` and the TVM
kernels all call :func:`validate_scan_args` (and :func:`validate_backward_args`) before touching
memory, so a kernel reached directly gives the same clear error as the public entry point.
Checks are O(1) in the tensor sizes (metadata only; values are never inspected: NaN and inf are
valid inputs and propagate as the recurrence says).
"""

from __future__ import annotations

import numbers

import torch

from .directions import DIRECTIONS

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_NAMES = ("x", "lam", "gl", "gm", "gr")
#: Largest ``chunk`` (kernels take it as a signed 64-bit integer).
MAX_CHUNK = 2**63 - 1


def validate_direction(direction) -> str:
    if not isinstance(direction, str):
        raise TypeError(f"direction: expected a str, one of {DIRECTIONS}; got {type(direction).__name__}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}; got {direction!r}")
    return direction


def validate_chunk(chunk) -> int:
    """``chunk`` as a Python int in ``[0, 2**63 - 1]``; integers only (no bool, float or tensor)."""
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral):
        raise TypeError(f"chunk: expected an int >= 0; got {type(chunk).__name__} {chunk!r:.80}")
    chunk = int(chunk)
    if chunk < 0:
        raise ValueError(f"chunk: expected an int >= 0 (0 = global propagation); got {chunk}")
    if chunk > MAX_CHUNK:
        raise ValueError(f"chunk: expected an int <= 2**63 - 1 (any chunk >= the line count equals 0); got {chunk}")
    return chunk


def _check_tensor(name: str, t, x=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor; got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor; got layout {t.layout}")


def validate_scan_args(x, lam, gl, gm, gr, direction, chunk, *, names: tuple[str, ...] = _NAMES) -> None:
    """Check the inputs of ``gspn_scan`` against docs/operator.md ("The scan").

    ``x``, ``lam``: ``(B, C, H, W)``; ``gl``, ``gm``, ``gr``: ``(B, G, H, W)`` with ``G`` dividing ``C``;
    one floating dtype and one device for all five; every dimension at least 1.
    Raises ``TypeError`` for wrong types/dtypes/layouts and ``ValueError`` for wrong shapes,
    devices or values. Any strides are accepted (kernels make their own contiguous copies), as are
    aliased arguments (the scan never writes its inputs) and element counts beyond 2**31.
    ``names`` are the five arguments' names in error messages (the fused scan calls them
    ``u, lam, al, am, ar``).
    """
    tensors = (x, lam, gl, gm, gr)
    for name, t in zip(names, tensors):
        _check_tensor(name, t)
    for name, t in zip(names, tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}: expected a floating dtype in "
                f"{[str(d).replace('torch.', '') for d in SUPPORTED_DTYPES]}; got {str(t.dtype).replace('torch.', '')}"
            )
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of {names[0]}); got {t.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of {names[0]}); got {t.device}")
    for name, t in zip(names, tensors):
        if t.dim() != 4:
            layout = "(B, C, H, W)" if name in names[:2] else "(B, G, H, W)"
            raise ValueError(f"{name}: expected a 4-D tensor {layout}; got shape {tuple(t.shape)}")
    if any(d == 0 for d in x.shape):
        raise ValueError(f"{names[0]}: expected every dimension >= 1; got shape {tuple(x.shape)}")
    if lam.shape != x.shape:
        raise ValueError(f"{names[1]}: expected shape {tuple(x.shape)} (the shape of {names[0]}); got {tuple(lam.shape)}")
    B, C, H, W = x.shape
    G = gl.shape[1]
    for name, t in zip(names[2:], tensors[2:]):
        if t.shape[0] != B or t.shape[2:] != x.shape[2:] or t.shape[1] != G:
            raise ValueError(
                f"{name}: expected shape (B, G, H, W) = ({B}, {G}, {H}, {W}) "
                f"(B, H, W from {names[0]}, G from {names[2]}); got {tuple(t.shape)}"
            )
    if G == 0 or C % G != 0:
        raise ValueError(f"{names[2]}: expected a group count G that divides C = {C}; got G = {G}")
    validate_direction(direction)
    validate_chunk(chunk)


FUSED_NAMES = ("u", "lam", "al", "am", "ar", "gate", "skip")


def validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk) -> None:
    """Check the inputs of ``gspn_fused_scan`` (docs/operator.md, "The fused scan"): ``u, lam, al,
    am, ar`` as ``x, lam, gl, gm, gr`` of :func:`validate_scan_args`, and ``gate``, ``skip``
    shaped, typed and placed like ``u``."""
    validate_scan_args(u, lam, al, am, ar, direction, chunk, names=FUSED_NAMES[:5])
    validate_like(u, "u", gate=gate, skip=skip)


def validate_like(x, x_name: str, **tensors) -> None:
    """Each of ``tensors`` (name=tensor) is a dense tensor of ``x``'s shape, dtype and device."""
    for name, t in tensors.items():
        _check_tensor(name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of {x_name}); got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of {x_name}); got {t.device}")
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected shape {tuple(x.shape)} (the shape of {x_name}); got {tuple(t.shape)}")


def validate_backward_args(gh, h, x) -> None:
    """Check the extra inputs of the adjoint scan: ``gh`` and the forward output ``h`` are tensors
    shaped, typed and placed like ``x`` (whose own checks are :func:`validate_scan_args`)."""
    validate_like(x, "x", gh=gh, h=h)


def validate_feature_map(x, channels: int, parameter: torch.Tensor, name: str = "x") -> None:
    """Check a layer's input: a dense 4-D ``(B, channels, H, W)`` tensor with every dimension >= 1,
    of the dtype and on the device of the layer's ``parameter`` (raised before any convolution)."""
    _check_tensor(name, x)
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected shape (B, {channels}, H, W); got {tuple(x.shape)}")
    if any(d == 0 for d in x.shape):
        raise ValueError(f"{name}: expected every dimension >= 1; got shape {tuple(x.shape)}")
    if x.dtype != parameter.dtype:
        raise TypeError(f"{name}: expected dtype {parameter.dtype} (the layer's parameters); got {x.dtype}")
    if x.device != parameter.device:
        raise ValueError(f"{name}: expected device {parameter.device} (the layer's parameters); got {x.device}")
