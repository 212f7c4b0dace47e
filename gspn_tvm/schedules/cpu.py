"""CPU (LLVM) schedule: parallel over planes, the line loop innermost and contiguous.

Forward: one task per ``(b, c)`` plane; backward: one task per weight group ``(b, g)``. Inside a
task the lines run in scan order and each line is one pass over contiguous memory, which LLVM
vectorizes (AVX2/AVX-512): symbolic line lengths rule out TVM's own fixed-width vectorize without a
scalar tail, and LLVM emits the vector body plus remainder itself.

Column scans (``l2r``, ``r2l``) would read memory with a stride of ``W`` elements, one cache line per
element. Their inputs are staged instead: ``TILE_LINES`` consecutive columns of every input are
copied (row by row, contiguously) into a transposed, padded local tile, and the scan steps read the
tile contiguously.
"""

from __future__ import annotations

from tvm import s_tir

from gspn_ref.directions import is_column

from ..compute import scan_backward, scan_forward

TILE_LINES = 32
# Pad each staged line to avoid power-of-two strides mapping every row onto one cache set.
_PAD_ALIGN, _PAD_OFFSET = 64, 16

FORWARD_INPUTS = ("x", "lam", "gl", "gm", "gr")
BACKWARD_INPUTS = ("gh", "x", "lam", "gl", "gm", "gr")


def _stage_column_tiles(sch: s_tir.Schedule, line_block, inputs) -> None:
    """Copy ``TILE_LINES`` columns of each input into a transposed local tile before they are scanned."""
    (line_loop,) = sch.get_loops(line_block)
    tile_loop, _ = sch.split(line_loop, [None, TILE_LINES])
    for name in inputs:
        stage = sch.cache_read(line_block, name, "global")
        sch.compute_at(stage, tile_loop)
        sch.transform_layout(stage, ("write", 0), lambda b, c, i, j: (b, c, j, i))
        sch.storage_align(stage, 0, 2, _PAD_ALIGN, _PAD_OFFSET)


def schedule_forward(direction: str, dtype: str):
    """Scheduled forward PrimFunc for ``direction`` and storage ``dtype``."""
    sch = s_tir.Schedule(scan_forward(direction, dtype))
    b, c = sch.get_loops(sch.get_sblock("plane"))
    sch.parallel(sch.fuse(b, c))
    if is_column(direction):
        _stage_column_tiles(sch, sch.get_sblock("line"), FORWARD_INPUTS)
    return sch.mod["main"]


def schedule_backward(direction: str, dtype: str):
    """Scheduled adjoint PrimFunc for ``direction`` and storage ``dtype``."""
    sch = s_tir.Schedule(scan_backward(direction, dtype))
    b, g = sch.get_loops(sch.get_sblock("slice"))
    sch.parallel(sch.fuse(b, g))
    if is_column(direction):
        _stage_column_tiles(sch, sch.get_sblock("line"), BACKWARD_INPUTS)
    return sch.mod["main"]
