"""Matmul / dense with a contiguous right-hand side: ``out[..., i, j] += a[..., i, k] * b[..., k, j]``."""

from __future__ import annotations

from tvm import s_tir

from .analysis import indexed_by, iterators, output_vars, position, reads_using, single_reduction
from .base import GSPNRule, ReductionPattern, tiled_reduction, uses_var


class Matmul(GSPNRule):
    """Register-tiled matmul: a tile of rows ``i`` x a vector of columns ``j`` per task.

    Applies to a static-size function with one reduction block (one reduction iterator) whose
    output's last axis ``j`` is read at the last axis of exactly one input (``b``, contiguous in
    ``j``) and whose second-to-last axis ``i`` is read by the other input only. A right-hand side
    stored as ``(j, k)`` (dense without a transpose) does not match; the fallback schedules it.
    """

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        found = single_reduction(sch, keep_pad=False)
        if found is None:
            return None
        block, _, epilogues = found
        stmt = sch.get(block)
        axes = output_vars(stmt)
        _, reduction = iterators(stmt)
        if axes is None or len(axes) < 2 or axes[-1] is None or len(reduction) != 1:
            return None
        row, col = axes[-2], axes[-1]
        right = reads_using(stmt, col)
        if len(right) != 1 or not indexed_by(right[0].region, (col,)) or not indexed_by(right[0].region[:-1], (reduction[0],)):
            return None
        left = reads_using(stmt, reduction[0])
        left = [r for r in left if not r.source.same_as(right[0].source)]
        if len(left) != 1 or uses_var(left[0].region, col):
            return None
        tile = position(stmt, row) if row is not None else None
        tiled_reduction(sch, block, epilogues, ReductionPattern(vector=[position(stmt, col)], tile=tile))
        return sch
