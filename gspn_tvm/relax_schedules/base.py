"""What every CPU schedule rule shares: the logged ``apply``, block analysis and the tiled reduction.

A rule (:class:`GSPNRule`) implements ``schedule(func, target)``: a ``tvm.s_tir.Schedule`` where the
pattern matches, ``None`` where it does not. A schedule primitive that fails inside a rule that
matched is logged (rule, function, reason) and the rule returns ``None``, so the next rule of the
pipeline gets the function; the last rule (:class:`~.fallback.ParallelLoops`) schedules anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

logger = logging.getLogger("gspn_tvm.relax_schedules")

#: Errors a schedule primitive raises when a rule's assumption about the function was wrong.
SCHEDULE_ERRORS = (s_tir.ScheduleError, tvm.error.InternalError)

#: Float32 lanes of the widest vector the register tile targets (AVX2: 8; AVX-512 gets two).
VECTOR_LANES = 8


def vector_registers(target) -> int:
    """Vector registers the accumulators of a tile can stay in: 32 with AVX-512 (x86-64-v4 or an
    ``avx512f`` attribute), else 16."""
    mcpu = str(target.attrs.get("mcpu", "")) if target is not None else ""
    mattr = [str(a) for a in (target.attrs.get("mattr", None) or [])] if target is not None else []
    return 32 if mcpu == "x86-64-v4" or "+avx512f" in mattr else 16


class GSPNRule(CPUScheduleRule):
    """A dlight CPU rule whose failures are logged, never swallowed silently."""

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        raise NotImplementedError

    def apply(self, func, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self.schedule(func, target)
        except SCHEDULE_ERRORS as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            name = describe(func)
            logger.warning(
                "gspn_tvm: schedule rule %s failed on %s (%s: %s); the next rule schedules it",
                type(self).__name__, name, type(error).__name__, lines[-1].strip()[:300] if lines else "",
            )  # fmt: skip
            return None


def describe(func: tirx.PrimFunc) -> str:
    """A name for log lines: the global symbol, else the blocks' names (private functions have none)."""
    if func.attrs is not None and "global_symbol" in func.attrs:
        return str(func.attrs["global_symbol"])
    sch = s_tir.Schedule(func)
    return "blocks " + ",".join(sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root")))


def static_extent(extent) -> int | None:
    """``extent`` as an int, or None when it is symbolic."""
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def pick_factor(extent: int, candidates: tuple[int, ...]) -> int:
    """The first of ``candidates`` that divides ``extent`` (so no tail and no predicate), else the
    largest divisor of ``extent`` not above the first candidate."""
    for factor in candidates:
        if extent % factor == 0:
            return factor
    return max(d for d in range(1, min(extent, candidates[0]) + 1) if extent % d == 0)


def pick_vector_factor(extents: list[int], widest: int = 2 * VECTOR_LANES) -> int:
    """Inner-loop length for loops of ``extents`` fused (row-major): a rectangle in them, so that
    the write-back of a tile covers exactly the tile (a chunk that straddled rows would be
    over-approximated to whole rows, writing values the tile did not compute).

    It divides the last extent ``W`` (widest multiple of the vector width first), or when ``W`` is
    short it is ``W`` times a divisor of the other extents.
    """
    last, rest = extents[-1], 1
    for extent in extents[:-1]:
        rest *= extent
    for factor in (widest, VECTOR_LANES):
        if last % factor == 0:
            return factor
    if last <= widest:
        return last * max(k for k in range(1, widest // last + 1) if rest % k == 0)
    return max(d for d in range(1, widest + 1) if last % d == 0)


def index_vars(region) -> list[tirx.Var | None]:
    """Per axis of a buffer region: the single block var it is indexed by, else None."""
    return [r.min if isinstance(r.min, tirx.Var) and static_extent(r.extent) == 1 else None for r in region]


def uses_var(region, var: tirx.Var) -> bool:
    """Whether any index of ``region`` depends on ``var``."""
    return any(
        any(v.same_as(var) for v in tirx.analysis.undefined_vars(r.min)) for r in region
    )


@dataclass
class ReductionPattern:
    """A reduction block seen as ``out[..., tile, ..., vector] += a[...] * b[...]``.

    ``vector``: spatial iterators (in order) fused into the contiguous inner loop; ``tile``: the
    spatial iterator unrolled into the register tile (output channels, matmul rows), or None.
    """

    vector: list[int]
    tile: int | None
    #: A spatial iterator (output rows) to run inside the reduction in blocks of ``rows_block``, with
    #: whole rows as the vector: the tile then spans several rows, and each weight loaded by the
    #: reduction serves all of them (for convolutions whose weights outweigh their outputs).
    rows: int | None = None
    rows_block: int = 1


#: A vector operand (the pixels of a 1x1 convolution, the right-hand side of a matmul: reduction x
#: vector extent, float32) larger than this is not swept whole for every tile of output rows: the
#: vectors run in blocks of at most VECTOR_BLOCK_BYTES of it, each block swept by every tile while it
#: stays in L2. GSPN-T's MLP convolutions on a 2-core EPYC (1 MiB L2 per core): 192 -> 768 channels
#: at 28x28 62 -> 265 GFLOP/s, 96 -> 384 at 56x56 76 -> 185; operands that fit (14x14 and smaller
#: maps) or reductions over 8 channels (the low-rank projections) were as fast or faster swept whole.
STREAMED_OPERAND_BYTES = 512 * 1024
VECTOR_BLOCK_BYTES = 128 * 1024
#: Vectors per block: the largest divisor of the vector count up to a power of two in this range,
#: halved from the top while the block is over VECTOR_BLOCK_BYTES.
MIN_VECTOR_BLOCK, MAX_VECTOR_BLOCK = 4, 16


def _vector_blocks(sch: s_tir.Schedule, vector_o, vector_i, reduction) -> int:
    """Vectors per block of the vector loop (1: no blocking), from the size of the vector operand."""
    lanes = static_extent(sch.get(vector_i).extent)
    count = static_extent(sch.get(vector_o).extent)
    depth = 1
    for loop in reduction:
        extent = static_extent(sch.get(loop).extent)
        if extent is None:
            return 1
        depth *= extent
    if lanes is None or count is None or depth * lanes * count * 4 <= STREAMED_OPERAND_BYTES:
        return 1
    limit = MAX_VECTOR_BLOCK
    while limit > MIN_VECTOR_BLOCK and depth * lanes * limit * 4 > VECTOR_BLOCK_BYTES:
        limit //= 2
    # a divisor of the vector count (a block with a tail would carry a predicate): 2 at least
    divisors = [d for d in range(2, min(limit, count - 1) + 1) if count % d == 0]
    return max(divisors) if divisors else 1


def tiled_reduction(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    epilogues: list,
    pattern: ReductionPattern,
    tile_candidates: tuple[int, ...] = (8, 6, 4),
) -> None:
    """Register-tiled micro-kernel for a static-size reduction block.

    Loops become ``parallel(outer spatial, tile_o, vector_o) / reduction / [rows_i] / tile_i
    (unrolled) / vector_i (vectorized)``: the ``tile_i x vector_i`` accumulators live in a local buffer that LLVM
    keeps in registers, each input vector is loaded once per reduction step and reused for every
    row of the tile, each weight is broadcast once per step. The accumulators are written back (with
    the epilogues inlined: bias, activation, residual) once per tile.
    """
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    kinds = ["S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in stmt.iter_vars]
    spatial = [i for i, k in enumerate(kinds) if k == "S"]
    reduction = [loops[i] for i, k in enumerate(kinds) if k == "R"]
    extents = [static_extent(sch.get(loop).extent) for loop in loops]
    vector_loops = [loops[i] for i in pattern.vector]
    vector = sch.fuse(*vector_loops) if len(vector_loops) > 1 else vector_loops[0]
    if pattern.rows is not None:
        rows_o, rows_i = sch.split(loops[pattern.rows], [None, pattern.rows_block])
        vector_o, vector_i = sch.split(vector, [None, extents[pattern.vector[-1]]])
    else:
        rows_o, rows_i = None, None
        vector_o, vector_i = sch.split(vector, [None, pick_vector_factor([extents[i] for i in pattern.vector])])
    outer = [
        rows_o if i == pattern.rows else loops[i]
        for i in spatial if i not in pattern.vector and i != pattern.tile
    ]
    if pattern.tile is not None:
        tile_o, tile_i = sch.split(loops[pattern.tile], [None, pick_factor(extents[pattern.tile], tile_candidates)])
        outer_tile, inner_tile = [tile_o], [tile_i]
    else:
        outer_tile, inner_tile = [], []
    inner_rows = [rows_i] if rows_i is not None else []
    blocks = _vector_blocks(sch, vector_o, vector_i, reduction) if pattern.tile is not None and pattern.rows is None else 1
    if blocks > 1:
        # A block of vectors outside the tile loop: every tile of the output rows reuses the same
        # slice of the vector operand while it is in L2 (see STREAMED_OPERAND_BYTES).
        block_o, block_i = sch.split(vector_o, [None, blocks])
        sch.reorder(*outer, block_o, *outer_tile, block_i, *reduction, *inner_rows, *inner_tile, vector_i)
        parallel = [*outer, block_o, *outer_tile, block_i]
    else:
        sch.reorder(*outer, *outer_tile, vector_o, *reduction, *inner_rows, *inner_tile, vector_i)
        parallel = [*outer, *outer_tile, vector_o]
    tile_loop = sch.fuse(*parallel) if len(parallel) > 1 else parallel[0]
    sch.parallel(tile_loop)
    accumulator = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulator, tile_loop, preserve_unit_loops=True)
    for epilogue in epilogues:
        try:
            sch.reverse_compute_inline(epilogue)
        except SCHEDULE_ERRORS:
            # Not inlinable into the write-back (e.g. reads another output position): a stage of its own.
            sch.reverse_compute_at(epilogue, tile_loop, preserve_unit_loops=True)
    # Loop kinds first: the update block loses its init below and no longer passes their checks.
    sch.vectorize(vector_i)
    if inner_tile:
        sch.unroll(inner_tile[0])
    init = sch.decompose_reduction(block, reduction[0])
    init_loops = sch.get_loops(init)
    if sch.get(init_loops[-1]).kind != tirx.ForKind.VECTORIZED:
        sch.vectorize(init_loops[-1])
    sch.vectorize(sch.get_loops(accumulator)[-1])
