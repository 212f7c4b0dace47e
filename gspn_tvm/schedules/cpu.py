"""CPU (LLVM) schedule: parallel over planes, one contiguous pass per line.

Forward: one task per ``(b, c)`` plane; backward: one task per weight group ``(b, g)``. Inside a
task the lines run in scan order and each line is one pass over contiguous memory, which LLVM
vectorizes (AVX2/AVX-512): symbolic line lengths rule out TVM's own fixed-width vectorize without a
scalar tail, and LLVM emits the vector body plus remainder itself.

Column scans (``l2r``, ``r2l``) would read and write memory with a stride of ``W`` elements, one
cache line per element. They use the compute variants that stage ``TILE_LINES`` columns
(``BACKWARD_TILE_LINES`` in the adjoint) through
transposed tiles declared in the TensorIR itself (:func:`gspn_tvm.compute.scan_forward_column_tiles`,
:func:`gspn_tvm.compute.scan_backward_column_tiles`: why there, not here, is said there); this
schedule only makes their tasks parallel. (Staging by ``cache_read``/``cache_write`` at a tile loop,
the schedule-only form, made TVM 0.27 size the tiles by the whole plane and keep them after the call.)

Row scans: the position loops that read the inputs and write a line buffer or the output (forward
``step`` and ``emit``) are vectorized by TVM itself (:data:`VECTOR_LANES` float32 lanes, the whole
vectors of a line, then a predicated tail split off by loop partitioning), not left to LLVM's loop
vectorizer. LLVM cannot tell that the workspace line buffers do not alias the inputs (the parallel
task reads its pointers from a closure, without ``noalias``), so it guards its vector loop with
run-time overlap checks, and LLVM 22 hoists those out of the line loop by widening them to the
whole plane, with a test that the line stride is non-negative: rows visited bottom to top (``b2t``)
have a negative stride, the test always failed, and every ``b2t`` line ran the scalar loop (4-16x
slower than ``t2b``). TVM's vectors need no such check.

Rows visited bottom to top (the forward ``b2t``, the adjoint of ``t2b``) are descending streams,
which the hardware prefetchers do not follow well on small planes: their compute is built with
``stream_hints`` (tasks in descending order, so that a thread's planes form one stream, and software
prefetches a few lines ahead, for writing too). 2-core EPYC, (1, 576, 56, 56): ``t2b`` adjoint
6.4 -> 3.3 ms (``b2t`` 2.9), ``b2t`` forward 1.24 -> 0.86, fused 3.2 -> 1.7 (``t2b`` 0.61 / 1.55).
"""

from __future__ import annotations

from tvm import s_tir

from gspn_ref.directions import is_column

from .. import compute
from ..compute import (
    fused_scan_forward,
    fused_scan_forward_column_tiles,
    fused_scan_forward_lanes,
    fused_scan_forward_lanes_projected,
    scan_backward,
    scan_backward_column_tiles,
    scan_backward_lanes,
    scan_forward,
    scan_forward_column_tiles,
    scan_forward_lanes,
)

#: Columns per staged tile of the forward column scans: ``TILE_LINES * (H + TILE_PAD)`` float32
#: elements per staged tensor and task (see :func:`gspn_tvm.compute.scan_forward_column_tiles`), 6
#: tensors (8 fused): 3.2 (4.3) MiB per thread at H = 1024. Wider tiles read longer runs of each
#: input row (512 bytes at 128 columns): at 1024^2 every row is another 4 KiB page, and the TLB
#: misses per tile row, not the cache, set the time. 2-core EPYC, (2, 8, 1024, 1024) l2r: plain
#: 67.7 ms (32) -> 30.6 (128), fused 99 -> 50 (128; 256 columns: 88, the tiles overflow the L2).
TILE_LINES = 128

#: Columns per staged tile of the adjoint column scans (12 staged tensors: 3.2 MiB per thread at
#: H = 1024): at (2, 8, 1024, 1024) 124.6 ms (32) -> 96.5 (64), 96.3 (128).
BACKWARD_TILE_LINES = 64

#: float32 lanes of the position loops vectorized by TVM in row scans (one AVX2 register; LLVM splits
#: it in two SSE registers at x86-64-v2).
VECTOR_LANES = 8

#: Blocks of the row forward bodies whose position loop is vectorized by TVM (see the module docstring).
ROW_VECTOR_BLOCKS = ("step", "emit")


def _parallel_tasks(func, task_block: str):
    """Parallel over the tasks of ``task_block`` (column tiles, where used, are in the compute)."""
    sch = s_tir.Schedule(func)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock(task_block))))
    return sch.mod["main"]


def _vectorized_positions(func, blocks):
    """``func`` with the innermost (position) loop of each of ``blocks`` split into whole vectors of
    :data:`VECTOR_LANES` lanes, vectorized by TVM; the last, partial vector is partitioned off into
    a scalar tail (``pragma_loop_partition_hint``), so the full vectors carry no predicate."""
    sch = s_tir.Schedule(func)
    for name in blocks:
        position = sch.get_loops(sch.get_sblock(name))[-1]
        vectors, lanes = sch.split(position, [None, VECTOR_LANES])
        sch.vectorize(lanes)
        sch.annotate(vectors, "pragma_loop_partition_hint", True)
    return sch.mod["main"]


def _row_forward(func):
    """A row forward body (plain or fused), parallel over planes, its position loops vectorized."""
    return _parallel_tasks(_vectorized_positions(func, ROW_VECTOR_BLOCKS), "plane")


#: Blocks of the lane kernels whose innermost loop (the ``LANES`` channels) TVM vectorizes.
LANE_VECTOR_BLOCKS = ("clear", "step", "ends", "carry", "emit", "gate",
                      "clear_previous_h", "load_previous_h", "adjoint_step", "gradients", "flow")  # fmt: skip


def _lane_kernel(func):
    """A lane kernel (forward, fused or adjoint; :func:`gspn_tvm.compute.scan_forward_lanes`): parallel
    over its tasks, every loop over the lanes of :data:`LANE_VECTOR_BLOCKS` one vector."""
    sch = s_tir.Schedule(func)
    for name in LANE_VECTOR_BLOCKS:
        try:
            block = sch.get_sblock(name)
        except s_tir.ScheduleError:
            continue  # "gate": the fused kernel only
        sch.vectorize(sch.get_loops(block)[-1])
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("lanes"))))
    return sch.mod["main"]


#: Row scans take the lane kernels only for rows shorter than this that are not whole vectors
#: (a row of 12, 14 or 20 is mostly a scalar tail; 16, 24 and 32 ran faster along the rows, and so
#: did 28 at GSPN-T's 28 x 28 planes).
LANE_ROW_LIMIT = 24


def lanes_serve(direction: str, C: int, H: int, W: int) -> bool:
    """Whether the lane kernel is the faster forward for planes ``(H, W)`` of ``C`` channels.

    Measured on a 2-core EPYC with the fused forward at ~450k elements per call (16 lanes):
    columns of planes up to 40 x 40 (14 x 14: 1.83 -> 0.54 ms, 28 x 28: 1.06 -> 0.50, 40 x 40: 0.68
    -> 0.59; 7 x 7 with 4608 channels: 1.82 -> 0.34), rows shorter than ``LANE_ROW_LIMIT`` that are
    not a multiple of 8 (14 x 14: 1.24 -> 0.53 ms, 20 x 20: 0.81 -> 0.52)."""
    if C % compute.LANES or H * W > compute.LANE_PLANE_ELEMENTS:
        return False
    return is_column(direction) or (W < LANE_ROW_LIMIT and W % VECTOR_LANES != 0)


def backward_lanes_serve(direction: str, C: int, G: int, H: int, W: int) -> bool:
    """Whether the lane adjoint serves planes ``(H, W)`` of ``C`` channels and ``G`` weight groups:
    where the lane forward does and each channel has its own weights (the lane adjoint keeps no
    sum over a group's channels)."""
    return G == C and lanes_serve(direction, C, H, W)


def projected_lanes_serve(C: int) -> bool:
    """Whether the lane kernel that projects its inputs from a proxy serves a fused scan of ``C``
    channels, at any plane size (so also in models compiled for any size): it reads one tensor of
    the scan's size instead of seven and never writes the projections, which pays at every plane
    measured (2-core EPYC, l2r: 576 x 56^2 1.8 ms against 4.2 ms for the column-tile kernel plus the
    four projections; 144 x 112^2 1.9 vs 4.5; 32 x 224^2 2.4 vs 4.0). A task stages nine buffers of
    ``LANES * H * W`` float32 (1.8 MiB at 56 x 56, 29 MiB at 224 x 224), kept by TVM's workspace pool
    per thread after the call."""
    return C % compute.LANES == 0


def schedule_backward_lanes(direction: str, dtype: str):
    """Scheduled lane adjoint (small planes, ``G == C``, ``C`` a multiple of ``LANES``)."""
    return _lane_kernel(scan_backward_lanes(direction, dtype))


def schedule_forward_lanes(direction: str, dtype: str):
    """Scheduled lane forward (small planes, ``C`` a multiple of ``LANES``; any direction)."""
    return _lane_kernel(scan_forward_lanes(direction, dtype))


def schedule_fused_forward_lanes(direction: str, dtype: str, packed_logits: bool = False):
    """Scheduled fused lane forward (see :func:`schedule_forward_lanes`)."""
    return _lane_kernel(fused_scan_forward_lanes(direction, dtype, packed_logits))


def schedule_fused_forward_lanes_projected(direction: str, dtype: str, proxy_channels: int):
    """Scheduled fused lane forward that projects its inputs from a proxy of ``proxy_channels``
    channels (:func:`gspn_tvm.compute.fused_scan_forward_lanes_projected`): the projections' lanes
    as vectors too."""
    sch = s_tir.Schedule(fused_scan_forward_lanes_projected(direction, dtype, proxy_channels))
    sch.vectorize(sch.get_loops(sch.get_sblock("project"))[-1])
    return _lane_kernel(sch.mod["main"])


def schedule_forward(direction: str, dtype: str):
    """Scheduled forward PrimFunc for ``direction`` and storage ``dtype`` (one task per ``(b, c)``)."""
    if is_column(direction):
        return _parallel_tasks(scan_forward_column_tiles(direction, dtype, TILE_LINES), "plane")
    return _row_forward(scan_forward(direction, dtype, stream_hints=True))


def schedule_fused_forward(direction: str, dtype: str, packed_logits: bool = False):
    """Scheduled fused forward PrimFunc (one task per ``(b, c)``; column scans staged like the scan's,
    with the same ``TILE_LINES``: 8 staged tensors instead of 6). ``packed_logits``: the variant that
    reads the three logits from one tensor (:func:`gspn_tvm.compute.fused_scan_forward`)."""
    if is_column(direction):
        return _parallel_tasks(fused_scan_forward_column_tiles(direction, dtype, TILE_LINES, packed_logits), "plane")
    return _row_forward(fused_scan_forward(direction, dtype, packed_logits, stream_hints=True))


def schedule_backward(direction: str, dtype: str):
    """Scheduled adjoint PrimFunc for ``direction`` and storage ``dtype`` (one task per ``(b, g)``)."""
    if is_column(direction):
        return _parallel_tasks(scan_backward_column_tiles(direction, dtype, BACKWARD_TILE_LINES), "slice")
    return _parallel_tasks(scan_backward(direction, dtype, stream_hints=True), "slice")
