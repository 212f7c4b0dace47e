"""The Stability-Context Condition (docs/operator.md ("Weight normalization")): raw logits -> row-stochastic weights."""

from __future__ import annotations

import torch

from .directions import is_column
from .validation import validate_direction

NORMALIZATION_FLOOR = 1e-7


def normalize_weights(al: torch.Tensor, am: torch.Tensor, ar: torch.Tensor, direction: str):
    """Sigmoid, zero the weights that point outside the line, divide by the row sum.

    ``al``, ``am``, ``ar``: logits of shape ``(B, G, H, W)``. Returns ``(gl, gm, gr)`` of the same
    shape and dtype, non-negative with ``gl + gm + gr == 1`` at every position (``gm == 1`` when the
    line has a single position). Written with out-of-place ops so it traces and exports.
    """
    validate_direction(direction)
    for name, t in (("al", al), ("am", am), ("ar", ar)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point torch.Tensor; got {getattr(t, 'dtype', type(t))}")
        if t.shape != al.shape:
            raise ValueError(f"{name}: expected shape {tuple(al.shape)} (the shape of al); got {tuple(t.shape)}")
    if al.dim() < 2:
        raise ValueError(f"al: expected at least 2 dims (..., H, W); got shape {tuple(al.shape)}")
    acc = torch.float64 if al.dtype == torch.float64 else torch.float32
    s_l, s_m, s_r = (torch.sigmoid(t.to(acc)) for t in (al, am, ar))
    axis = -2 if is_column(direction) else -1
    n = al.shape[axis]
    pos = torch.arange(n, device=al.device)
    shape = (n, 1) if axis == -2 else (n,)
    s_l = s_l * (pos > 0).reshape(shape).to(acc)
    s_r = s_r * (pos < n - 1).reshape(shape).to(acc)
    total = torch.clamp(s_l + s_m + s_r, min=NORMALIZATION_FLOOR)
    return tuple((s / total).to(al.dtype) for s in (s_l, s_m, s_r))
