"""CUDA schedule: the whole scan is one kernel launch.

A thread block owns one channel slice (forward: one ``(b, c)`` plane; backward: the channels of one
weight group ``(b, g)``) and walks its lines in scan order. The line axis is mapped to the threads of
the block (``THREADS`` threads, each covering every ``THREADS``-th position), so row scans read and
write global memory coalesced. The previous line (``state``), the new line (``current``) and, in the
adjoint, the flows of every channel of the slice live in shared memory; TVM's thread-sync pass puts
a ``__syncthreads()`` between the steps of consecutive lines (the new line reads neighbours written
by other threads).

Column scans (``l2r``, ``r2l``) read their lines directly: thread ``p`` reads row ``p`` of the
current column, one 32-byte sector per element, and the next ``32 / itemsize - 1`` columns hit the
same sectors in L2. Staging tiles of columns through shared memory (``cache_read`` into
``shared.dyn`` at a tile of lines, as the CPU schedule does) is not done: TVM 0.27's barrier planner
treats all dynamic shared buffers as one buffer and rejects the staged copy loops ("Cannot insert
syncs inside condition"). The same planner is why every block of the compute writes at most one
on-chip buffer.
"""

from __future__ import annotations

from tvm import s_tir

from ..compute import fused_scan_forward, scan_backward, scan_forward

THREADS = 256
#: Threads per block of the wide variants of the row-scan forwards (``t2b``, ``b2t``), which run for
#: rows of at least ``WIDE_MIN_LENGTH`` positions. Each line step costs one barrier and one round of
#: dependent global loads per ``threads`` positions, so a row of 1024 takes four rounds with 256
#: threads and one with 1024: measured on an H100 at (16, 8, 1024, 1024), t2b 7.3 ms with 256
#: threads, 4.9 ms with 512, 4.5 ms with 1024; at 56x56 planes 1024 threads are 2.9x slower than 256
#: (few positions, idle threads at every barrier). Column scans gained nothing (30.4 vs 29.6 ms).
WIDE_THREADS = 1024
WIDE_MIN_LENGTH = 384
WIDE_DIRECTIONS = ("t2b", "b2t")


def wide_name(symbol: str) -> str:
    """Symbol of the wide (``WIDE_THREADS``) variant of the compiled function ``symbol``."""
    return f"{symbol}_wide"


def uses_wide(direction: str, H: int, W: int) -> bool:
    """Whether a forward of ``direction`` over (H, W) planes runs the wide variant."""
    return direction in WIDE_DIRECTIONS and W >= WIDE_MIN_LENGTH


def _bind_positions(sch: s_tir.Schedule, block, threads: int = THREADS) -> None:
    """Map the innermost (position) loop of ``block`` onto ``threads`` of ``threadIdx.x``."""
    loop = sch.get_loops(block)[-1]
    _, inner = sch.split(loop, [None, threads])
    sch.bind(inner, "threadIdx.x")


def _to_shared(sch: s_tir.Schedule, writer_blocks) -> None:
    for block_name, buffer_name in writer_blocks:
        sch.set_scope(sch.get_sblock(block_name), buffer_name, "shared.dyn")


def _schedule_planes(func, threads: int):
    """One thread block per ``(b, c)`` plane, positions on threads, the line buffers in shared memory."""
    sch = s_tir.Schedule(func)
    b, c = sch.get_loops(sch.get_sblock("plane"))
    sch.bind(sch.fuse(b, c), "blockIdx.x")
    for name in ("clear", "step", "ends", "carry", "emit"):
        _bind_positions(sch, sch.get_sblock(name), threads)
    _to_shared(sch, (("clear", "state"), ("step", "current")))
    return sch.mod["main"]


def schedule_forward(direction: str, dtype: str, threads: int = THREADS):
    """Scheduled forward PrimFunc for ``direction`` and storage ``dtype``, ``threads`` per block."""
    return _schedule_planes(scan_forward(direction, dtype), threads)


def schedule_fused_forward(direction: str, dtype: str, threads: int = THREADS):
    """Scheduled fused forward PrimFunc: the blocks of the forward scan, so the same mapping (the
    weights are normalized by the thread that reads them; ``h`` stays in shared memory)."""
    return _schedule_planes(fused_scan_forward(direction, dtype), threads)


def schedule_backward(direction: str, dtype: str):
    """Scheduled adjoint PrimFunc for ``direction`` and storage ``dtype``."""
    sch = s_tir.Schedule(scan_backward(direction, dtype))
    b, g = sch.get_loops(sch.get_sblock("slice"))
    sch.bind(sch.fuse(b, g), "blockIdx.x")
    clear_flow = sch.get_sblock("clear_flow")
    sch.fuse(*sch.get_loops(clear_flow)[-3:])
    for name in ("clear_flow", "clear_previous_h", "load_previous_h", "adjoint_step", "input_gradients",
                 "flow", "contribution", "contribution_ends", "store_weight_grad"):
        _bind_positions(sch, sch.get_sblock(name))
    # The channel sum: initialise once per line, then one pass per channel with positions on threads
    # (the channel loop outside the position loop keeps every barrier outside the bounds test).
    total = sch.get_sblock("sum_weight_grad")
    _, position, channel = sch.get_loops(total)[-3:]
    sch.reorder(channel, position)
    _bind_positions(sch, total)
    _to_shared(
        sch,
        (
            ("clear_flow", "flow"),
            ("adjoint_step", "adjoint"),
            ("clear_previous_h", "previous_h"),
            ("contribution", "contribution"),
            ("sum_weight_grad", "weight_grad"),
        ),
    )
    sch.decompose_reduction(total, channel)
    return sch.mod["main"]


#: Largest on-chip state of one thread block of the adjoint (bytes); beyond it the reference runs
#: instead (``gspn_tvm.kernels`` warns once). 48 KiB is what a block gets without opting in, and
#: TVM 0.27's launcher does not reliably opt in: on an H100 the adjoint at (1, 8, L, L), G = 8,
#: launched for L = 832 (48.8 KiB by :func:`backward_shared_bytes`) and failed to launch
#: (CUDA_ERROR_INVALID_VALUE) for L = 1024 (61.5 KiB).
SHARED_LIMIT_BYTES = 48 * 1024


def backward_shared_bytes(C: int, G: int, length: int) -> int:
    """Shared memory one thread block of :func:`schedule_backward` uses for ``C`` channels, ``G``
    groups and lines of ``length``: the float32 buffers it puts in ``shared.dyn`` above (flows and
    adjoints of the group's channels with their halos, the previous line of ``h``, contributions,
    the weight-gradient sums)."""
    group = C // G
    return 4 * ((group + 1) * 3 * (length + 2) + group * 3 * length + 3 * length + length + 2 * (length + 2))


def backward_fits(C: int, G: int, length: int) -> bool:
    """Whether the adjoint of that shape fits in :data:`SHARED_LIMIT_BYTES`."""
    return backward_shared_bytes(C, G, length) <= SHARED_LIMIT_BYTES
