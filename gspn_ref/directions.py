"""Scan directions (docs/operator.md ("Layout and directions")).

A direction picks the scanned axis and the order of the lines. Positions ``p`` along a line are
always the original coordinate; only the order of the lines is reversed for ``b2t`` and ``r2l``.
"""

from __future__ import annotations

import torch

DIRECTIONS: tuple[str, ...] = ("t2b", "b2t", "l2r", "r2l")


def is_column(direction: str) -> bool:
    """True when a line is a column (``l2r``, ``r2l``), False when it is a row."""
    return direction in ("l2r", "r2l")


def is_reversed(direction: str) -> bool:
    """True when lines are scanned from the highest index down (``b2t``, ``r2l``)."""
    return direction in ("b2t", "r2l")


def line_count(direction: str, H: int, W: int) -> int:
    """Number of lines ``L`` of a scan: ``H`` for row scans, ``W`` for column scans."""
    return W if is_column(direction) else H


def line_length(direction: str, H: int, W: int) -> int:
    """Length ``P`` of one line: ``W`` for row scans, ``H`` for column scans."""
    return H if is_column(direction) else W


def line_index(direction: str, s: int, n_lines: int) -> int:
    """Original row/column index of the ``s``-th scanned line."""
    return n_lines - 1 - s if is_reversed(direction) else s


def scan_frame(t: torch.Tensor, direction: str) -> torch.Tensor:
    """View ``(N, K, H, W)`` as ``(N, K, lines, positions)`` without copying or flipping.

    The line axis stays in original order; use :func:`line_index` to walk it in scan order.
    """
    return t.transpose(-1, -2) if is_column(direction) else t


def segment_starts(s: int, chunk: int) -> bool:
    """True when scanned line ``s`` starts a propagation segment (``R(s) = 0``)."""
    return s == 0 or (chunk > 0 and s % chunk == 0)
