"""1x1 convolutions (and ``Linear2d``) in NCHW: ``out[n, co, h, w] += x[n, ci, h, w] * w[co, ci]``."""

from __future__ import annotations

from tvm import s_tir

from .analysis import indexed_by, loop_extent, nchw_reduction, position, reads_using
from .base import (
    VECTOR_LANES, GSPNRule, ReductionPattern, pick_vector_factor, tiled_reduction, uses_var,
    vector_registers,
)


#: Vector registers left to the operands (the input rows, a broadcast weight) beside the accumulators.
SPARE_REGISTERS = 4
#: Reductions of at most this many input channels (low-rank projections: a 16-channel proxy to 4608
#: weight maps in the GSPN layer) are left to :class:`~.fallback.ParallelLoops` unless the pixel
#: vector is 16 wide: a register tile's set-up and write-back are not amortized over so short a
#: reduction. One thread, 16 -> 4608 channels: 28x28 4.6 -> 1.5 ms, 56x56 15.0 -> 7.4, 14x14 0.39 ->
#: 0.35; at 112x112 (16-wide vectors) the tile stays ahead, 18.6 against 30.3; 64 channels at 56x56
#: also favour the tile (5.7 against 9.3).
SHALLOW_REDUCTION = 32


class Conv1x1(GSPNRule):
    """Register-tiled 1x1 convolution: a tile of output channels x a vector of pixels (``h*w`` as
    one contiguous loop) per task, reduction over input channels with the accumulators in registers.

    Applies to a static-size function with one reduction block whose output is 4-D, whose last two
    output axes are spatial iterators ``h, w`` that some input reads at its own last two axes
    unchanged (pointwise), and whose channel axis is read by another input (the weight) that does
    not depend on ``h, w``. Maps whose rows are one vector, where the registers hold a tile of
    channels x every row (AVX-512), take that tile instead; shallow reductions on maps without a
    16-wide pixel vector are left to the fallback (see ``SHALLOW_REDUCTION``).
    """

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        found = nchw_reduction(sch, keep_pad=False)
        if found is None:
            return None
        block, _, epilogues, (channel, row, col), reduction = found
        stmt = sch.get(block)
        data = reads_using(stmt, col)
        weights = reads_using(stmt, channel)
        if not reduction or not data or not weights or len(reads_using(stmt, row)) != len(data):
            return None
        if not all(indexed_by(r.region, (row, col)) and not uses_var(r.region, channel) for r in data):
            return None
        if any(uses_var(r.region, row) or uses_var(r.region, col) for r in weights):
            return None
        rows, cols = loop_extent(sch, block, row), loop_extent(sch, block, col)
        depth = 1
        for var in reduction:
            depth *= loop_extent(sch, block, var)
        if depth <= SHALLOW_REDUCTION and pick_vector_factor([rows, cols]) < 2 * VECTOR_LANES:
            return None  # ParallelLoops: the reduction unrolled in one contiguous loop per channel
        tiles = [t for t in (8, 6, 4) if t * rows <= vector_registers(target) - SPARE_REGISTERS]
        if cols <= VECTOR_LANES and rows > 1 and tiles:
            # Rows of one vector (7x7 maps): a vector per row and channel, the whole map in the tile.
            # One row per tile loaded eight weights for eight FMAs of 7 lanes; four channels x seven
            # rows load 11 operands for 28 FMAs (GSPN-T's 7x7 MLP, 2-core EPYC with AVX-512: 9.3 ->
            # 7.8 ms for its four convolutions).
            pattern = ReductionPattern(vector=[position(stmt, col)], tile=position(stmt, channel),
                                       rows=position(stmt, row), rows_block=rows)
            tiled_reduction(sch, block, epilogues, pattern, tile_candidates=tuple(tiles))
            return sch
        pattern = ReductionPattern(vector=[position(stmt, row), position(stmt, col)], tile=position(stmt, channel))
        tiled_reduction(sch, block, epilogues, pattern)
        return sch
