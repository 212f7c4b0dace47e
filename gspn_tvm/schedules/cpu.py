"""CPU (LLVM) schedule: parallel over planes, one contiguous pass per line.

Forward: one task per ``(b, c)`` plane; backward: one task per weight group ``(b, g)``. Inside a
task the lines run in scan order and each line is one pass over contiguous memory, which LLVM
vectorizes (AVX2/AVX-512): symbolic line lengths rule out TVM's own fixed-width vectorize without a
scalar tail, and LLVM emits the vector body plus remainder itself.

Column scans (``l2r``, ``r2l``) would read and write memory with a stride of ``W`` elements, one
cache line per element. They use the compute variants that stage ``TILE_LINES`` columns through
transposed tiles declared in the TensorIR itself (:func:`gspn_tvm.compute.scan_forward_column_tiles`,
:func:`gspn_tvm.compute.scan_backward_column_tiles`: why there, not here, is said there); this
schedule only makes their tasks parallel. (Staging by ``cache_read``/``cache_write`` at a tile loop,
the schedule-only form, made TVM 0.27 size the tiles by the whole plane and keep them after the call.)
"""

from __future__ import annotations

from tvm import s_tir

from gspn_ref.directions import is_column

from ..compute import (
    fused_scan_forward,
    fused_scan_forward_column_tiles,
    scan_backward,
    scan_backward_column_tiles,
    scan_forward,
    scan_forward_column_tiles,
)

#: Columns per staged tile. Column scans stage ``TILE_LINES * (H + TILE_PAD)`` float32 elements per
#: staged tensor and task (see :func:`gspn_tvm.compute.scan_forward_column_tiles`): 6 tensors forward,
#: 12 in the adjoint. 32 measured faster than 16 and 64 on a 2-core EPYC at (2, 8, 1024, 1024)
#: (16.0x vs 22.8x and 18.3x the floor): 64 columns of 6 tensors overflow a 1 MiB L2 at H = 1024.
TILE_LINES = 32


def _parallel_tasks(func, task_block: str):
    """Parallel over the tasks of ``task_block`` (column tiles, where used, are in the compute)."""
    sch = s_tir.Schedule(func)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock(task_block))))
    return sch.mod["main"]


def schedule_forward(direction: str, dtype: str):
    """Scheduled forward PrimFunc for ``direction`` and storage ``dtype`` (one task per ``(b, c)``)."""
    if is_column(direction):
        return _parallel_tasks(scan_forward_column_tiles(direction, dtype, TILE_LINES), "plane")
    return _parallel_tasks(scan_forward(direction, dtype), "plane")


def schedule_fused_forward(direction: str, dtype: str):
    """Scheduled fused forward PrimFunc (one task per ``(b, c)``; column scans staged like the scan's,
    with the same ``TILE_LINES``: 8 staged tensors instead of 6)."""
    if is_column(direction):
        return _parallel_tasks(fused_scan_forward_column_tiles(direction, dtype, TILE_LINES), "plane")
    return _parallel_tasks(fused_scan_forward(direction, dtype), "plane")


def schedule_backward(direction: str, dtype: str):
    """Scheduled adjoint PrimFunc for ``direction`` and storage ``dtype`` (one task per ``(b, g)``)."""
    if is_column(direction):
        return _parallel_tasks(scan_backward_column_tiles(direction, dtype, TILE_LINES), "slice")
    return _parallel_tasks(scan_backward(direction, dtype), "slice")
