"""Dense affinity matrices (docs/operator.md, "The scan": matrix form; "The project's layer": its affinity), for small maps.

Built from the propagation matrix ``M`` by a linear solve, independently of the scan code, so that
``h == A @ x`` is a real check of the scan.
"""

from __future__ import annotations

import torch

from .directions import is_column, line_count, line_index, line_length, segment_starts
from .validation import validate_chunk, validate_direction


def _flat_index(direction: str, line: torch.Tensor, pos: torch.Tensor, W: int) -> torch.Tensor:
    """Row-major index ``i * W + j`` of (line, position) pairs in the original frame."""
    return pos * W + line if is_column(direction) else line * W + pos


def propagation_matrix(gl, gm, gr, direction: str, chunk: int = 0) -> torch.Tensor:
    """``M`` of shape ``(B, G, H*W, H*W)``: ``h = lam*x + M h`` with row-major flattening."""
    validate_direction(direction)
    validate_chunk(chunk)
    B, G, H, W = gl.shape
    N = H * W
    n_lines, P = line_count(direction, H, W), line_length(direction, H, W)
    M = torch.zeros(B, G, N, N, dtype=torch.float64, device=gl.device)
    pos = torch.arange(P, device=gl.device)
    for s in range(1, n_lines):
        if segment_starts(s, chunk):
            continue
        cur = torch.full_like(pos, line_index(direction, s, n_lines))
        prev = torch.full_like(pos, line_index(direction, s - 1, n_lines))
        dst = _flat_index(direction, cur, pos, W)
        for w, offset in ((gl, -1), (gm, 0), (gr, 1)):
            src_pos = pos + offset
            ok = (src_pos >= 0) & (src_pos < P)
            src = _flat_index(direction, prev[ok], src_pos[ok], W)
            weights = w.to(torch.float64).flatten(2)[..., dst[ok]]
            M[..., dst[ok], src] = weights
    return M


def affinity_matrix(lam, gl, gm, gr, direction: str, chunk: int = 0) -> torch.Tensor:
    """``A = (I - M)^{-1} diag(lam)`` of shape ``(B, C, H*W, H*W)``, float64.

    ``h.flatten(2) == A @ x.flatten(2)`` for ``h = gspn_scan(x, lam, gl, gm, gr, direction, chunk)``.
    Memory is ``O(B * C * (H*W)^2)``: for small maps only.
    """
    B, C, H, W = lam.shape
    G = gl.shape[1]
    if C % G:
        raise ValueError(f"gl: expected a group count G that divides C = {C}; got G = {G}")
    M = propagation_matrix(gl, gm, gr, direction, chunk).repeat_interleave(C // G, dim=1)
    eye = torch.eye(H * W, dtype=torch.float64, device=lam.device)
    return torch.linalg.solve(eye - M, torch.diag_embed(lam.to(torch.float64).flatten(2)))
