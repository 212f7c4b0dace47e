"""Dense k x k convolutions in NCHW (patch embedding, downsampling): ``out[n, co, oh, ow] +=
pad(x)[n, ci, s*oh + kh, s*ow + kw] * w[co, ci, kh, kw]``."""

from __future__ import annotations

from tvm import s_tir

from .analysis import indexed_by, loop_extent, nchw_reduction, parallel_pads, position, reads_using
from .base import VECTOR_LANES, GSPNRule, ReductionPattern, tiled_reduction, uses_var, vector_registers


#: Output rows of at most this many columns are vectorized whole (several rows per tile); wider
#: rows (56: the patch embedding) measured faster one vector chunk per tile.
MAX_ROW_VECTOR = 28
#: Accumulators per tile when it spans rows (in L1 rather than registers: 8 KiB of float32).
MAX_TILE_ELEMENTS = 2048
TILE_CHANNELS = 8


def rows_in_tile_elements(rows: int, cols: int, channels: int = TILE_CHANNELS) -> int:
    """The most output rows (dividing ``rows``) whose ``channels`` x rows x ``cols`` accumulators fit
    ``MAX_TILE_ELEMENTS`` (a tile in L1)."""
    return max(k for k in range(1, rows + 1) if rows % k == 0 and channels * k * cols <= MAX_TILE_ELEMENTS)


def rows_per_tile(rows: int, cols: int, registers: int, channels: int = TILE_CHANNELS) -> int:
    """Output rows per tile: the most (at least 2, dividing ``rows``) whose ``channels`` x rows x
    vectors accumulators fit the vector registers, else the most whose accumulators fit
    ``MAX_TILE_ELEMENTS``. GSPN-T's 28 -> 14 downsampling (rows of 14: two vectors) on a 2-core
    EPYC with AVX-512: 2 rows in registers 1.74 ms, 7 rows through L1 3.48 ms; rows of 7 (a prime
    count) and of 28 (four vectors) have no such count and keep the L1 tile (one row: slower)."""
    vectors = -(-cols // VECTOR_LANES)
    fitting = [k for k in range(2, rows + 1) if rows % k == 0 and channels * k * vectors <= registers]
    return max(fitting) if fitting else rows_in_tile_elements(rows, cols, channels)


class SpatialConv(GSPNRule):
    """Register-tiled dense convolution: a tile of output channels x a vector along the output row
    per task, reductions (input channels, kernel rows and columns) outside the tile.

    The padding stays a stage of its own (parallel, computed once) so that the inner loop reads
    without bounds checks. Applies to a static-size function with one reduction block whose 4-D
    output's channel is read by the weight only and whose output column is read by the data at a
    shifted or strided position, with a reduction over the data's channel axis (so not depthwise,
    which :class:`~.depthwise_conv.DepthwiseConv` schedules).
    """

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        found = nchw_reduction(sch, keep_pad=True)
        if found is None:
            return None
        block, pads, epilogues, (channel, row, col), reduction = found
        stmt = sch.get(block)
        data, weights = reads_using(stmt, col), reads_using(stmt, channel)
        if len(data) != 1 or len(weights) != 1 or uses_var(data[0].region, channel) or uses_var(weights[0].region, col):
            return None
        if len(data[0].region) != 4 or not any(uses_var(data[0].region[1:2], r) for r in reduction):
            return None  # depthwise (or not a convolution)
        if indexed_by(data[0].region, (row, col)):
            return None  # pointwise (1x1, stride 1): Conv1x1, or the fallback for shallow reductions
        parallel_pads(sch, pads)
        pattern = ReductionPattern(vector=[position(stmt, col)], tile=position(stmt, channel))
        rows, cols = loop_extent(sch, block, row), loop_extent(sch, block, col)
        if cols <= MAX_ROW_VECTOR:
            # Several whole output rows per tile: the weights (larger than the outputs in the
            # downsampling layers) are read once per tile instead of once per row.
            pattern.rows = position(stmt, row)
            pattern.rows_block = rows_per_tile(rows, cols, vector_registers(target))
        tiled_reduction(sch, block, epilogues, pattern)
        return sch
