"""Reference line scan of docs/operator.md ("The scan") and its adjoint ("The adjoint"), written for clarity.

Each function takes one Python step per scanned line and is vectorized over batch, channels and
the positions of a line. Half-precision inputs are accumulated in float32, float64 stays float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .directions import is_reversed, line_index, scan_frame, segment_starts
from .validation import validate_backward_args, validate_scan_args


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel accumulates in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _from_lower(v: torch.Tensor) -> torch.Tensor:
    """``out[..., p] = v[..., p-1]``, zero at ``p = 0``."""
    return F.pad(v[..., :-1], (1, 0))


def _from_higher(v: torch.Tensor) -> torch.Tensor:
    """``out[..., p] = v[..., p+1]``, zero at ``p = P-1``."""
    return F.pad(v[..., 1:], (0, 1))


def _zero_at(p: int, v: torch.Tensor) -> torch.Tensor:
    """``v`` with position ``p`` of the line set to exactly 0: a weight gradient whose neighbour is
    outside the line is zero (docs/operator.md ("The adjoint")), even where ``d * 0`` would be NaN (``d`` infinite)."""
    v[..., p] = 0
    return v


def _grouped(t: torch.Tensor, groups: int, direction: str) -> torch.Tensor:
    """``(B, C, H, W)`` -> scan frame ``(B, G, C//G, L, P)`` in the accumulation dtype."""
    f = scan_frame(t.to(accumulation_dtype(t.dtype)), direction)
    return f.reshape(f.shape[0], groups, -1, *f.shape[-2:])


def _weight_frames(gl, gm, gr, direction):
    """Weights as ``(B, G, 1, L, P)`` in the accumulation dtype.

    Weights that point outside the line are set to zero, so whatever they hold cannot leak in.
    """
    G = gl.shape[1]
    wl, wm, wr = (_grouped(w, G, direction).clone() for w in (gl, gm, gr))
    wl[..., 0] = 0
    wr[..., -1] = 0
    return wl, wm, wr


def _from_frames(lines: list[torch.Tensor], direction: str, shape, dtype) -> torch.Tensor:
    """Stack per-line tensors given in scan order back into ``shape`` (original frame)."""
    if is_reversed(direction):
        lines = lines[::-1]
    B, K = shape[:2]
    stacked = torch.stack(lines, dim=-2)  # (..., L, P) in original line order
    stacked = stacked.reshape(B, K, *stacked.shape[-2:])
    return scan_frame(stacked, direction).to(dtype).contiguous()


def gspn_scan_ref(
    x: torch.Tensor, lam: torch.Tensor, gl: torch.Tensor, gm: torch.Tensor, gr: torch.Tensor,
    direction: str = "t2b", chunk: int = 0,
) -> torch.Tensor:
    """Reference forward scan: ``h`` of shape ``(B, C, H, W)``, same dtype as ``x``.

    ``x``, ``lam``: ``(B, C, H, W)``; ``gl``, ``gm``, ``gr``: ``(B, G, H, W)`` with ``G | C``.
    ``direction`` in ``t2b, b2t, l2r, r2l``; ``chunk >= 0`` (0: global, k: restart every k lines).
    """
    validate_scan_args(x, lam, gl, gm, gr, direction, chunk)
    G = gl.shape[1]
    u = _grouped(x, G, direction) * _grouped(lam, G, direction)
    wl, wm, wr = _weight_frames(gl, gm, gr, direction)
    n_lines = u.shape[-2]
    lines: list[torch.Tensor] = []
    for s in range(n_lines):
        i = line_index(direction, s, n_lines)
        h_s = u[..., i, :]
        if not segment_starts(s, chunk):
            prev = lines[-1]
            h_s = h_s + wl[..., i, :] * _from_lower(prev) + wm[..., i, :] * prev + wr[..., i, :] * _from_higher(prev)
        lines.append(h_s)
    return _from_frames(lines, direction, x.shape, x.dtype)


def gspn_scan_backward_ref(
    gh: torch.Tensor, x: torch.Tensor, lam: torch.Tensor, gl: torch.Tensor, gm: torch.Tensor, gr: torch.Tensor,
    h: torch.Tensor, direction: str = "t2b", chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference adjoint scan (docs/operator.md ("The adjoint")).

    ``gh`` and ``h`` (the forward output) are ``(B, C, H, W)``. Returns ``(dx, dlam, dgl, dgm, dgr)``
    with the shapes and dtypes of ``x, lam, gl, gm, gr``; weight gradients are summed over the
    channels of each weight group.
    """
    validate_scan_args(x, lam, gl, gm, gr, direction, chunk)
    validate_backward_args(gh, h, x)
    G = gl.shape[1]
    wl, wm, wr = _weight_frames(gl, gm, gr, direction)
    ghf, hf, xf, lamf = (_grouped(t, G, direction) for t in (gh, h, x, lam))
    n_lines = ghf.shape[-2]
    d_lines: list[torch.Tensor] = [None] * n_lines  # indexed by scan order s
    for s in range(n_lines - 1, -1, -1):
        i = line_index(direction, s, n_lines)
        d_s = ghf[..., i, :]
        if s + 1 < n_lines and not segment_starts(s + 1, chunk):
            nxt = line_index(direction, s + 1, n_lines)
            d_next = d_lines[s + 1]
            d_s = (
                d_s
                + _from_higher(wl[..., nxt, :] * d_next)
                + wm[..., nxt, :] * d_next
                + _from_lower(wr[..., nxt, :] * d_next)
            )
        d_lines[s] = d_s

    dx, dlam, dgl, dgm, dgr = [], [], [], [], []
    for s in range(n_lines):
        i = line_index(direction, s, n_lines)
        d_s = d_lines[s]
        dx.append(lamf[..., i, :] * d_s)
        dlam.append(xf[..., i, :] * d_s)
        if segment_starts(s, chunk):
            zero = torch.zeros_like(d_s[:, :, 0])
            dgl.append(zero), dgm.append(zero), dgr.append(zero)
        else:
            prev = hf[..., line_index(direction, s - 1, n_lines), :]
            dgl.append(_zero_at(0, (d_s * _from_lower(prev)).sum(2)))
            dgm.append((d_s * prev).sum(2))
            dgr.append(_zero_at(-1, (d_s * _from_higher(prev)).sum(2)))
    return (
        _from_frames(dx, direction, x.shape, x.dtype),
        _from_frames(dlam, direction, lam.shape, lam.dtype),
        _from_frames(dgl, direction, gl.shape, gl.dtype),
        _from_frames(dgm, direction, gm.shape, gm.dtype),
        _from_frames(dgr, direction, gr.shape, gr.dtype),
    )
