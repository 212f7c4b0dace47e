"""Test helpers: the shared strategies, inputs and dtype-derived comparison (from the public
``gspn_ref.testing``), and an oracle of the scan that shares no code with ``gspn_ref``."""

from __future__ import annotations

import torch

from gspn_ref import is_column, is_reversed, line_count
from gspn_ref.testing import (  # noqa: F401  (re-exported for the tests)
    FLOAT_DTYPES,
    ScanCase,
    assert_close_scaled,
    make_scan_inputs,
    scan_cases,
    scan_tolerance,
)


def naive_scan_float64(x, lam, gl, gm, gr, direction: str, chunk: int = 0) -> torch.Tensor:
    """SPEC section 2 written out element by element in float64: an oracle for every scan kernel.

    ``x``, ``lam``: ``(B, C, H, W)``; ``gl``, ``gm``, ``gr``: ``(B, G, H, W)``. Returns float64
    ``(B, C, H, W)``. Shares no code with ``gspn_ref`` (no scan, direction or affinity helper): one
    Python loop over the lines in scan order and the positions along a line, out-of-range
    neighbours skipped (their weights are never read).
    """
    x, lam, gl, gm, gr = (t.detach().to(device="cpu", dtype=torch.float64) for t in (x, lam, gl, gm, gr))
    C, G = x.shape[1], gl.shape[1]
    group_of_channel = [c // (C // G) for c in range(C)]
    gl, gm, gr = (w[:, group_of_channel] for w in (gl, gm, gr))
    columns = direction in ("l2r", "r2l")
    if columns:  # make dim 2 the line index and dim 3 the position along a line
        x, lam, gl, gm, gr = (t.transpose(2, 3) for t in (x, lam, gl, gm, gr))
    n_lines, P = x.shape[2], x.shape[3]
    order = list(range(n_lines)) if direction in ("t2b", "l2r") else list(range(n_lines - 1, -1, -1))
    h = torch.zeros_like(x)
    previous = None
    for s, line in enumerate(order):
        restart = s == 0 or (chunk > 0 and s % chunk == 0)
        for p in range(P):
            value = lam[:, :, line, p] * x[:, :, line, p]
            if not restart:
                for weight, q in ((gl, p - 1), (gm, p), (gr, p + 1)):
                    if 0 <= q < P:
                        value = value + weight[:, :, line, p] * h[:, :, previous, q]
            h[:, :, line, p] = value
        previous = line
    return (h.transpose(2, 3) if columns else h).contiguous()


def scan_order_of_line(direction, H, W):
    """``(H*W,)`` tensor: the scan index ``s`` of the line holding each row-major position."""
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    line = j if is_column(direction) else i
    n_lines = line_count(direction, H, W)
    return (n_lines - 1 - line if is_reversed(direction) else line).flatten()


def poison_unread_weights(gl, gm, gr, direction, chunk, poison=float("inf")):
    """Copies of the weights with ``poison`` wherever SPEC section 2 says a weight is never used
    (``gl`` at ``p = 0``, ``gr`` at ``p = P - 1``, all three on a segment-start line), and the
    copies with 0 there; plus the boolean ``(H, W)`` masks of both kinds of position."""
    H, W = gl.shape[-2:]
    s = scan_order_of_line(direction, H, W).reshape(H, W)
    starts = (s == 0) | ((s % chunk) == 0 if chunk else torch.zeros_like(s, dtype=torch.bool))
    p_axis = -2 if is_column(direction) else -1
    first = torch.zeros(H, W, dtype=torch.bool)
    last = torch.zeros(H, W, dtype=torch.bool)
    first.select(p_axis, 0).fill_(True)
    last.select(p_axis, -1).fill_(True)
    masks = (first | starts, starts, last | starts)
    poisoned = tuple(w.masked_fill(m, poison) for w, m in zip((gl, gm, gr), masks))
    zeroed = tuple(w.masked_fill(m, 0) for w, m in zip((gl, gm, gr), masks))
    return poisoned, zeroed, first, last, starts
