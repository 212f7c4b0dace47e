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

Which forward runs (:func:`forward_symbol`): lines of up to 1024 positions run a line pipeline
(below; one thread per position, 64, 256 or 1024 threads per block), longer rows the wide variant
(1024 threads), longer columns the default schedule. On an H100 the line pipeline took the
(16, 8, 1024, 1024) t2b forward from 7.3 ms to 1.34 ms (81% of the copy bandwidth) and GSPN-T's
56 x 56 planes from 0.12 to 0.03 ms. The fused scan of long columns runs composed
(:func:`fused_runs_composed`). The adjoint keeps the schedule above.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T

from gspn_ref.directions import is_column, is_reversed

from .. import compute
from ..compute import fused_scan_forward, scan_backward, scan_forward

THREADS = 256
#: Threads per block of the wide variants of the row-scan forwards (``t2b``, ``b2t``), which run for
#: rows longer than the line pipelines take (below). Each line step costs one barrier and one round of
#: dependent global loads per ``threads`` positions, so a row of 1024 takes four rounds with 256
#: threads and one with 1024: measured on an H100 at (16, 8, 1024, 1024), t2b 7.3 ms with 256
#: threads, 4.9 ms with 512, 4.5 ms with 1024; at 56x56 planes 1024 threads are 2.9x slower than 256
#: (few positions, idle threads at every barrier). Column scans gained nothing (30.4 vs 29.6 ms).
WIDE_THREADS = 1024
WIDE_DIRECTIONS = ("t2b", "b2t")


def wide_name(symbol: str) -> str:
    """Symbol of the wide (``WIDE_THREADS``) variant of the compiled function ``symbol``."""
    return f"{symbol}_wide"


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


# --- Line pipeline: the forwards for lines of up to 1024 positions ----------------------------------
#
# The scheduled forwards above spend each line step on dependent global loads and four barriers
# (step, ends, carry, emit), with the plane's index arithmetic (64-bit divisions by C and G) inside
# the position loop. The line pipeline is written with its threads bound: one thread per position
# (``threads >= line length``), the plane's offsets computed once, the inputs of ``TILE`` lines
# loaded into registers together (``TILE`` loads in flight per thread and array), the previous line
# in one of two shared buffers (even and odd steps alternate, so one barrier per line suffices: a
# step reads one buffer and writes the other). The barrier is outside every condition, which keeps
# TVM's barrier planner content.

#: Threads per block of the line-pipeline variants, fewest first; one thread per position, so a
#: variant takes lines of up to its thread count.
LINE_THREADS = (64, 256, 1024)
#: Lines whose inputs are loaded together (registers per thread: 4 per line, 6 for the fused scan).
TILE = {False: 8, True: 4}


def line_class_name(symbol: str, threads: int) -> str:
    """Symbol of the line-pipeline variant with ``threads`` threads of the compiled function ``symbol``."""
    return f"{symbol}_lines{threads}"


def line_class(direction: str, H: int, W: int) -> int | None:
    """Threads of the line-pipeline variant for planes (H, W) scanned in ``direction`` (None: lines
    longer than the largest class, which run the scheduled forward)."""
    length = H if is_column(direction) else W
    return next((threads for threads in LINE_THREADS if length <= threads), None)


def forward_symbol(symbol: str, direction: str, H: int, W: int) -> str:
    """The compiled forward that runs planes (H, W) in ``direction``: a line-pipeline variant, else
    the wide variant for long rows, else ``symbol`` itself."""
    threads = line_class(direction, H, W)
    if threads is not None:
        return line_class_name(symbol, threads)
    return wide_name(symbol) if direction in WIDE_DIRECTIONS else symbol


def fused_runs_composed(direction: str, H: int, W: int) -> bool:
    """Whether the fused scan of planes (H, W) runs as normalize + scan + gate/skip (float32 torch
    ops around the compiled scan) instead of its fused kernel: column scans of lines longer than the
    256-thread class. Measured on an H100 at (16, 8, 1024, 1024), l2r: fused line pipeline 44.8 ms
    (its 1024 threads leave 64 registers each for seven strided column streams and the
    normalization), scheduled fused kernel 44.0 ms, composed 17.3 ms; rows at the same size: fused
    3.3 ms, composed 8.0 ms; 56 x 56 columns: fused 0.13 ms, composed 0.34 ms."""
    return is_column(direction) and H > LINE_THREADS[-2]


def _line_pipeline(direction: str, dtype: str, fused: bool, threads: int):
    """Body macro of the line-pipeline forward (see above) for lines of at most ``threads``."""
    f32 = compute.ACCUMULATION_DTYPE
    column, reverse, tile = is_column(direction), is_reversed(direction), TILE[fused]

    @T.macro(hygienic=False)
    def line_step(previous, current, k):
        """Step ``s0 * tile + k``: the line from ``previous`` (the last line, float32) into
        ``current`` and the output; names from :func:`planes` where it is expanded."""
        if p < length and s0 * tile + k < n_lines:
            s: T.int64 = s0 * tile + k
            line: T.int64 = n_lines - 1 - s if reverse else s
            i: T.int64 = p if column else line
            j: T.int64 = line if column else p
            restart = T.meta_var(compute._starts_segment(s, chk))
            h: T.float32 = lx[k] + T.Select(
                restart, T.float32(0),
                compute._term(p > 0, rl[k], previous[p]) + rm[k] * previous[p + 1]
                + compute._term(p + 1 < length, rr[k], previous[p + 2]))  # fmt: skip
            current[p + 1] = h
            out[b, c, i, j] = T.Cast(out.dtype, h * rg[k] + rs[k] if fused else h)

    @T.macro
    def planes(x, lam, wl, wm, wr, gate, skip, out, B, C, G, H, W, chk):
        n_lines = T.meta_var(W if column else H)
        length = T.meta_var(H if column else W)
        plane = T.launch_thread("blockIdx.x", B * C)
        tx = T.launch_thread("threadIdx.x", threads)
        even = T.alloc_buffer((threads + 2,), f32, scope="shared")
        odd = T.alloc_buffer((threads + 2,), f32, scope="shared")
        lx = T.alloc_buffer((tile,), f32, scope="local")  # lam * x
        rl = T.alloc_buffer((tile,), f32, scope="local")
        rm = T.alloc_buffer((tile,), f32, scope="local")
        rr = T.alloc_buffer((tile,), f32, scope="local")
        rg = T.alloc_buffer((tile,), f32, scope="local")  # gate (fused)
        rs = T.alloc_buffer((tile,), f32, scope="local")  # u * skip (fused)
        b: T.int64 = T.Cast("int64", plane) // C
        c: T.int64 = T.Cast("int64", plane) % C
        g: T.int64 = c // (C // G)
        p: T.int64 = T.Cast("int64", tx)
        for q in range(2):
            if q * threads + tx < threads + 2:
                even[q * threads + tx] = T.float32(0)
                odd[q * threads + tx] = T.float32(0)
        T.tvm_storage_sync("shared")
        for s0 in range((n_lines + tile - 1) // tile):
            for k in T.unroll(tile):
                if p < length and s0 * tile + k < n_lines:
                    line: T.int64 = n_lines - 1 - (s0 * tile + k) if reverse else s0 * tile + k
                    i: T.int64 = p if column else line
                    j: T.int64 = line if column else p
                    lx[k] = T.Cast(f32, lam[b, c, i, j]) * T.Cast(f32, x[b, c, i, j])
                    weights = T.meta_var(compute._weights(fused, T.Cast(f32, wl[b, g, i, j]), T.Cast(f32, wm[b, g, i, j]),
                                                          T.Cast(f32, wr[b, g, i, j]), p, length))  # fmt: skip
                    rl[k] = weights[0]
                    rm[k] = weights[1]
                    rr[k] = weights[2]
                    if fused:
                        rg[k] = T.Cast(f32, gate[b, c, i, j])
                        rs[k] = T.Cast(f32, x[b, c, i, j]) * T.Cast(f32, skip[b, c, i, j])
            # tile is even, so every even step reads ``even`` and every odd step ``odd``.
            for k2 in T.unroll(tile // 2):
                line_step(even, odd, 2 * k2)
                T.tvm_storage_sync("shared")
                line_step(odd, even, 2 * k2 + 1)
                T.tvm_storage_sync("shared")

    return planes


def line_pipeline_forward(direction: str, dtype: str, threads: int):
    """The line-pipeline forward PrimFunc (``threads`` per block, lines of at most ``threads``)."""
    body = _line_pipeline(direction, dtype, False, threads)
    return compute._forward_func(dtype, False, body, compute.forward_name(direction))


def line_pipeline_fused_forward(direction: str, dtype: str, threads: int):
    """The line-pipeline fused forward PrimFunc (``threads`` per block, lines of at most ``threads``)."""
    body = _line_pipeline(direction, dtype, True, threads)
    return compute._forward_func(dtype, True, body, compute.fused_forward_name(direction))
