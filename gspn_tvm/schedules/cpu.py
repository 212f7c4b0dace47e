"""CPU (LLVM) schedule: parallel over planes, one contiguous pass per line.

Forward: one task per ``(b, c)`` plane; backward: one task per weight group ``(b, g)``. Inside a
task the lines run in scan order and each line is one pass over contiguous memory, which LLVM
vectorizes (AVX2/AVX-512): symbolic line lengths rule out TVM's own fixed-width vectorize without a
scalar tail, and LLVM emits the vector body plus remainder itself.

Column scans (``l2r``, ``r2l``) would read and write memory with a stride of ``W`` elements, one
cache line per element. They use the compute variants that stage ``TILE_LINES`` columns through
transposed tiles declared in the TensorIR itself (:func:`gspn_tvm.compute.scan_forward_column_tiles`,
:func:`gspn_tvm.compute.scan_backward_column_tiles`: why there, not here, is said there); this
schedule only makes their tasks parallel. :func:`_stage_column_tiles` (cache_read/cache_write at a
tile loop) is the schedule-only form, kept for reference: TVM 0.27 sizes its tiles by the plane.
"""

from __future__ import annotations

from tvm import s_tir

from gspn_ref.directions import is_column

from ..compute import scan_backward, scan_backward_column_tiles, scan_forward, scan_forward_column_tiles

#: Columns per staged tile. Column scans stage ``TILE_LINES * (H + TILE_PAD)`` float32 elements per
#: staged tensor and task (see :func:`gspn_tvm.compute.scan_forward_column_tiles`): 6 tensors forward,
#: 12 in the adjoint. 32 measured faster than 16 and 64 on a 2-core EPYC at (2, 8, 1024, 1024)
#: (16.0x vs 22.8x and 18.3x the floor): 64 columns of 6 tensors overflow a 1 MiB L2 at H = 1024.
TILE_LINES = 32
# Pad each staged line to avoid power-of-two strides mapping every row onto one cache set.
_PAD_ALIGN, _PAD_OFFSET = 64, 16

FORWARD_INPUTS = ("x", "lam", "gl", "gm", "gr")
FORWARD_OUTPUTS = ("h",)
BACKWARD_INPUTS = ("gh", "x", "lam", "gl", "gm", "gr", "h")
BACKWARD_OUTPUTS = ("dx", "dlam", "dgl", "dgm", "dgr")


def _transposed(b, c, i, j):
    return (b, c, j, i)


def _stage_column_tiles(sch: s_tir.Schedule, line_block, inputs, outputs) -> None:
    """Stage ``TILE_LINES`` columns of each input/output through transposed local tiles."""
    # Output caches are created before the line loop is split: created after the split, TVM 0.27's
    # reverse_compute_at drops the bounds predicate of the copy-back for reversed scans (r2l), whose
    # last tile starts before column 0.
    write_stages = [sch.cache_write(line_block, name, "global") for name in outputs]
    (line_loop,) = sch.get_loops(line_block)
    tile_loop, _ = sch.split(line_loop, [None, TILE_LINES])
    for name in inputs:
        stage = sch.cache_read(line_block, name, "global")
        sch.compute_at(stage, tile_loop)
        sch.transform_layout(stage, ("write", 0), _transposed)
        sch.storage_align(stage, 0, 2, _PAD_ALIGN, _PAD_OFFSET)
    for stage in write_stages:
        sch.reverse_compute_at(stage, tile_loop)
        sch.transform_layout(stage, ("read", 0), _transposed)
        sch.storage_align(line_block, _write_index(sch, line_block, stage), 2, _PAD_ALIGN, _PAD_OFFSET)


def _write_index(sch, block, stage) -> int:
    """Index, among the writes of ``block``, of the buffer that ``stage`` copies out."""
    staged = sch.get(stage).reads[0].source
    for index, region in enumerate(sch.get(block).writes):
        if region.source.same_as(staged):
            return index
    raise ValueError("staged output not written by the line block")


def _schedule(func, task_block: str, direction: str, inputs, outputs):
    """Parallel over the tasks of ``task_block``; column scans staged through transposed tiles."""
    sch = s_tir.Schedule(func)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock(task_block))))
    if is_column(direction):
        _stage_column_tiles(sch, sch.get_sblock("line"), inputs, outputs)
    return sch.mod["main"]


def _parallel_tasks(func, task_block: str):
    """Parallel over the tasks of ``task_block`` (the tiles are already in the compute)."""
    sch = s_tir.Schedule(func)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock(task_block))))
    return sch.mod["main"]


def schedule_forward(direction: str, dtype: str):
    """Scheduled forward PrimFunc for ``direction`` and storage ``dtype`` (one task per ``(b, c)``)."""
    if is_column(direction):
        return _parallel_tasks(scan_forward_column_tiles(direction, dtype, TILE_LINES), "plane")
    return _schedule(scan_forward(direction, dtype), "plane", direction, FORWARD_INPUTS, FORWARD_OUTPUTS)


def schedule_backward(direction: str, dtype: str):
    """Scheduled adjoint PrimFunc for ``direction`` and storage ``dtype`` (one task per ``(b, g)``)."""
    if is_column(direction):
        return _parallel_tasks(scan_backward_column_tiles(direction, dtype, TILE_LINES), "slice")
    return _schedule(scan_backward(direction, dtype), "slice", direction, BACKWARD_INPUTS, BACKWARD_OUTPUTS)
