"""Shared test helpers: input factories, dtype-derived tolerances, Hypothesis strategies."""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st

from gspn_ref import DIRECTIONS, accumulation_dtype, line_count, normalize_weights

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def make_scan_inputs(B, C, G, H, W, dtype=torch.float32, seed=0, normalized=True, *, direction="t2b", device="cpu"):
    """Random ``(x, lam, gl, gm, gr)``: ``x``, ``lam`` ``(B, C, H, W)``, weights ``(B, G, H, W)``.

    ``normalized=True`` gives row-stochastic weights for ``direction`` (SPEC section 3); otherwise the
    weights are ``sigmoid(logits) / 3`` like the conformance vectors (contracting, not normalized).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    lam = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    logits = torch.randn(3, B, G, H, W, generator=gen, dtype=torch.float64) * 2
    if normalized:
        gl, gm, gr = normalize_weights(*logits, direction)
    else:
        gl, gm, gr = torch.sigmoid(logits) / 3
    return tuple(t.to(dtype=dtype, device=device) for t in (x, lam, gl, gm, gr))


def scan_tolerance(dtype: torch.dtype, n_terms: int) -> float:
    """Relative tolerance of a scan result, derived from the dtype.

    One rounding of the output to ``dtype`` (2 eps) plus a rounding error of the accumulation dtype
    for each of the ``n_terms`` accumulated steps (lines, or lines times channels for weight grads).
    Applied as ``|a - e| <= tol * (|e| + max|e|)``: relative to the output scale, since the
    terms of a scan can cancel.
    """
    eps = torch.finfo(dtype).eps
    acc_eps = torch.finfo(accumulation_dtype(dtype)).eps
    return 2 * eps + 8 * acc_eps * (n_terms + 1)


def assert_close_scaled(actual, expected, dtype, n_terms, what="output"):
    """Assert ``actual`` matches ``expected`` within :func:`scan_tolerance`; prints the max difference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    tol = scan_tolerance(dtype, n_terms)
    scale = max(e.abs().max().item(), 1e-30) if e.numel() else 1.0
    err = (a - e).abs()
    worst = err.max().item() if err.numel() else 0.0
    print(f"{what}: max |diff| = {worst:.3e}, scale = {scale:.3e}, rtol = {tol:.3e}")
    bad = err > tol * (e.abs() + scale)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ; max |diff| {worst:.3e} > {tol:.3e} * scale {scale:.3e}"


class ScanCase(NamedTuple):
    B: int
    C: int
    G: int
    H: int
    W: int
    direction: str
    chunk: int

    @property
    def n_lines(self) -> int:
        return line_count(self.direction, self.H, self.W)


@st.composite
def scan_shapes(draw, max_side: int = 9, max_batch: int = 2):
    """``(B, C, G, H, W)`` with ``G | C``; sides include 1 and odd sizes."""
    B = draw(st.integers(1, max_batch))
    G = draw(st.integers(1, 3))
    C = G * draw(st.integers(1, 3))
    H = draw(st.integers(1, max_side))
    W = draw(st.integers(1, max_side))
    return B, C, G, H, W


@st.composite
def scan_cases(draw, max_side: int = 9, max_batch: int = 2):
    """A full scan configuration, ``chunk`` often not dividing the number of lines."""
    B, C, G, H, W = draw(scan_shapes(max_side, max_batch))
    direction = draw(st.sampled_from(DIRECTIONS))
    n_lines = line_count(direction, H, W)
    chunk = draw(st.one_of(st.just(0), st.integers(1, n_lines + 1)))
    return ScanCase(B, C, G, H, W, direction, chunk)


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
