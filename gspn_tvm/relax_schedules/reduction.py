"""Reductions that are not convolutions or matmuls: norms, means, sums over channels or planes."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .fallback import ParallelLoops


class Reduction(ParallelLoops):
    """Parallel outer spatial loops, with the output's contiguous spatial loop moved inside the
    reduction (a mean over channels in NCHW then reads whole rows, vectorized, per channel).

    Applies to functions with at least one reduction block (the convolution and matmul rules come
    first in the pipeline and take theirs).
    """

    def schedule(self, func, target):
        infos = normalize_prim_func(s_tir.Schedule(func))
        if infos is None or not any("R" in info.dom_kind() for info in infos):
            return None
        return super().schedule(func, target)
