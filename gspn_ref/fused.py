"""Reference of the fused scan (docs/operator.md, "The fused scan") and its adjoint.

The fused scan takes the raw weight logits and the layer's output gate and skip, so that a kernel
can normalize the weights on the fly and write the layer's per-direction output in one pass:

    y = gspn_scan(u, lam, *normalize_weights(al, am, ar, direction), direction, chunk) * gate + u * skip

Everything is computed in the accumulation dtype (float32 for half precision, float64 for float64)
and rounded once, at the end: the weights and ``h`` are never rounded to the input dtype.
"""

from __future__ import annotations

import torch

from .normalize import normalize_weights, normalize_weights_backward
from .scan import accumulation_dtype, gspn_scan_backward_ref, gspn_scan_ref
from .validation import validate_fused_args, validate_like


def _acc(*tensors):
    acc = accumulation_dtype(tensors[0].dtype)
    return tuple(t.to(acc) for t in tensors)


def gspn_fused_scan_ref(
    u: torch.Tensor, lam: torch.Tensor, al: torch.Tensor, am: torch.Tensor, ar: torch.Tensor,
    gate: torch.Tensor, skip: torch.Tensor, direction: str = "t2b", chunk: int = 0,
) -> torch.Tensor:
    """Reference fused scan: ``y`` of shape ``(B, C, H, W)``, same dtype as ``u``.

    ``u``, ``lam``, ``gate``, ``skip``: ``(B, C, H, W)``; ``al``, ``am``, ``ar`` (weight logits):
    ``(B, G, H, W)`` with ``G | C``. ``direction`` and ``chunk`` as in :func:`gspn_scan_ref`.
    """
    validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk)
    u_, lam_, al_, am_, ar_, gate_, skip_ = _acc(u, lam, al, am, ar, gate, skip)
    gl, gm, gr = normalize_weights(al_, am_, ar_, direction)
    h = gspn_scan_ref(u_, lam_, gl, gm, gr, direction, chunk)
    return (h * gate_ + u_ * skip_).to(u.dtype)


def gspn_fused_scan_backward_ref(
    gy: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, al: torch.Tensor, am: torch.Tensor, ar: torch.Tensor,
    gate: torch.Tensor, skip: torch.Tensor, direction: str = "t2b", chunk: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Reference adjoint of the fused scan: ``(du, dlam, dal, dam, dar, dgate, dskip)``, shaped and
    typed like ``(u, lam, al, am, ar, gate, skip)``; ``gy`` is ``(B, C, H, W)``.

    Recomputes the weights and ``h`` (nothing is saved by the forward but its inputs), then
    ``dh = gy * gate``, the adjoint scan, and the adjoint of the normalization.
    """
    validate_fused_args(u, lam, al, am, ar, gate, skip, direction, chunk)
    validate_like(u, "u", gy=gy)
    gy_, u_, lam_, al_, am_, ar_, gate_, skip_ = _acc(gy, u, lam, al, am, ar, gate, skip)
    gl, gm, gr = normalize_weights(al_, am_, ar_, direction)
    h = gspn_scan_ref(u_, lam_, gl, gm, gr, direction, chunk)
    du, dlam, dgl, dgm, dgr = gspn_scan_backward_ref(gy_ * gate_, u_, lam_, gl, gm, gr, h, direction, chunk)
    dal, dam, dar = normalize_weights_backward(dgl, dgm, dgr, al_, am_, ar_, direction)
    grads = (du + gy_ * skip_, dlam, dal, dam, dar, gy_ * h, gy_ * u_)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (u, lam, al, am, ar, gate, skip)))
