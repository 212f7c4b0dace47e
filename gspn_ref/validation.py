"""Argument checks at the boundary of the operator (raised once, before any kernel runs)."""

from __future__ import annotations

import torch

from .directions import DIRECTIONS

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_NAMES = ("x", "lam", "gl", "gm", "gr")


def validate_direction(direction) -> str:
    if not isinstance(direction, str):
        raise TypeError(f"direction: expected a str, one of {DIRECTIONS}; got {type(direction).__name__}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}; got {direction!r}")
    return direction


def validate_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk: expected an int >= 0; got {type(chunk).__name__} {chunk!r}")
    if chunk < 0:
        raise ValueError(f"chunk: expected an int >= 0 (0 = global propagation); got {chunk}")
    return chunk


def validate_scan_args(x, lam, gl, gm, gr, direction, chunk) -> None:
    """Check the inputs of ``gspn_scan`` against SPEC section 2.

    ``x``, ``lam``: ``(B, C, H, W)``; ``gl``, ``gm``, ``gr``: ``(B, G, H, W)`` with ``G`` dividing ``C``;
    one floating dtype and one device for all five; every dimension at least 1.
    Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong shapes or values.
    """
    tensors = (x, lam, gl, gm, gr)
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor; got {type(t).__name__}")
    for name, t in zip(_NAMES, tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}: expected a floating dtype in "
                f"{[str(d).replace('torch.', '') for d in SUPPORTED_DTYPES]}; got {str(t.dtype).replace('torch.', '')}"
            )
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x); got {t.dtype}")
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x); got {t.device}")
    for name, t in zip(_NAMES, tensors):
        if t.dim() != 4:
            layout = "(B, C, H, W)" if name in ("x", "lam") else "(B, G, H, W)"
            raise ValueError(f"{name}: expected a 4-D tensor {layout}; got shape {tuple(t.shape)}")
    if any(d == 0 for d in x.shape):
        raise ValueError(f"x: expected every dimension >= 1; got shape {tuple(x.shape)}")
    if lam.shape != x.shape:
        raise ValueError(f"lam: expected shape {tuple(x.shape)} (the shape of x); got {tuple(lam.shape)}")
    B, C, H, W = x.shape
    G = gl.shape[1]
    for name, t in zip(_NAMES[2:], tensors[2:]):
        if t.shape[0] != B or t.shape[2:] != x.shape[2:] or t.shape[1] != G:
            raise ValueError(
                f"{name}: expected shape (B, G, H, W) = ({B}, {G}, {H}, {W}) "
                f"(B, H, W from x, G from gl); got {tuple(t.shape)}"
            )
    if G == 0 or C % G != 0:
        raise ValueError(f"gl: expected a group count G that divides C = {C}; got G = {G}")
    validate_direction(direction)
    validate_chunk(chunk)
