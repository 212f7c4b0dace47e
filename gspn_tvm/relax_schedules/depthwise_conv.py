"""Depthwise k x k convolutions in NCHW (the token mixers' ``conv2d``, GSPN-T's 7 x 7 of 144 to 1152
channels): ``out[n, c, oh, ow] += pad(x)[n, c, s*oh + kh, s*ow + kw] * w[c, 0, kh, kw]``."""

from __future__ import annotations

from tvm import s_tir

from .analysis import loop_extent, nchw_reduction, parallel_pads, position, reads_using
from .base import GSPNRule, ReductionPattern, index_vars, tiled_reduction, uses_var
from .spatial_conv import rows_in_tile_elements


class DepthwiseConv(GSPNRule):
    """A task per channel and block of output rows: the block's accumulators (whole rows, the
    vector) in a local tile, the kernel taps outside it, so that each tap's weight is broadcast
    once per tile and each input row loaded once per tap and output row. The padding stays a stage
    of its own (parallel, computed once): the inner loop reads without bounds checks.

    Applies to a static-size function with one reduction block whose 4-D output's channel indexes
    the data's channel axis itself (one input channel per output channel) and a weight that does
    not depend on the output position, and whose reductions (the kernel taps) index the data's
    rows and columns only. Else None (dense convolutions: :class:`~.spatial_conv.SpatialConv`).
    """

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        found = nchw_reduction(sch, keep_pad=True)
        if found is None:
            return None
        block, pads, epilogues, (channel, row, col), reduction = found
        stmt = sch.get(block)
        data = reads_using(stmt, col)
        if len(data) != 1 or len(data[0].region) != 4 or not reduction:
            return None
        data_channel = index_vars(data[0].region[1:2])[0]
        if data_channel is None or not data_channel.same_as(channel):
            return None  # dense, grouped with several channels per group, or not a convolution
        if any(uses_var(data[0].region[:2], r) for r in reduction):
            return None
        weights = [r for r in reads_using(stmt, channel) if not r.source.same_as(data[0].source)]
        if len(weights) != 1 or uses_var(weights[0].region, row) or uses_var(weights[0].region, col):
            return None
        parallel_pads(sch, pads)
        # As many rows as MAX_TILE_ELEMENTS holds (the plane, up to 2048 positions): tiles of rows
        # that fit the registers measured slower here (GSPN-T, 4 rows of 56: 1.0 -> 5.8 ms).
        block_rows = rows_in_tile_elements(loop_extent(sch, block, row), loop_extent(sch, block, col), channels=1)
        pattern = ReductionPattern(vector=[position(stmt, col)], tile=None, rows=position(stmt, row), rows_block=block_rows)
        tiled_reduction(sch, block, epilogues, pattern)
        return sch
