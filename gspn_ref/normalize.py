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
    zero = torch.zeros((), dtype=acc, device=al.device)
    # where, not a product with the mask: a weight outside the line is 0 even if its logit is NaN.
    s_l = torch.where((pos > 0).reshape(shape), s_l, zero)
    s_r = torch.where((pos < n - 1).reshape(shape), s_r, zero)
    total = torch.clamp(s_l + s_m + s_r, min=NORMALIZATION_FLOOR)
    return tuple((s / total).to(al.dtype) for s in (s_l, s_m, s_r))


def normalize_weights_backward(dgl, dgm, dgr, al, am, ar, direction: str):
    """Adjoint of :func:`normalize_weights`: ``(dal, dam, dar)`` for the weight gradients ``dg*``.

    With ``s_k = sigmoid(a_k) * mask_k`` and ``t = max(s_l + s_m + s_r, 1e-7)``, ``g_k = s_k / t``:
    ``ds_k = (dg_k - [t > floor] * sum_j dg_j g_j) / t`` and ``da_k = ds_k * mask_k * σ'(a_k)``
    (the sum over ``g_j`` rather than ``s_j / t``: exactly zero where a line has one position).
    Computed in the accumulation dtype; returned in the dtype of ``al``. Shapes ``(B, G, H, W)``.
    """
    acc = torch.float64 if al.dtype == torch.float64 else torch.float32
    sig = [torch.sigmoid(t.to(acc)) for t in (al, am, ar)]
    axis = -2 if is_column(direction) else -1
    n = al.shape[axis]
    pos = torch.arange(n, device=al.device)
    shape = (n, 1) if axis == -2 else (n,)
    inside = [(pos > 0).reshape(shape), torch.ones((), dtype=torch.bool, device=al.device), (pos < n - 1).reshape(shape)]
    zero = torch.zeros((), dtype=acc, device=al.device)
    s = [torch.where(m, sg, zero) for sg, m in zip(sig, inside)]
    total = s[0] + s[1] + s[2]
    t = torch.clamp(total, min=NORMALIZATION_FLOOR)
    dg = [d.to(acc) for d in (dgl, dgm, dgr)]
    g = [sk / t for sk in s]
    dot = (dg[0] * g[0] + dg[1] * g[1] + dg[2] * g[2]) * (total > NORMALIZATION_FLOOR).to(acc)
    return tuple(torch.where(m, (d - dot) / t * sg * (1 - sg), zero).to(al.dtype) for d, m, sg in zip(dg, inside, sig))
