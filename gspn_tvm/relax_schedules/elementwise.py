"""Elementwise and injective functions (activations, gating, split, transpose, concatenation)."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline

from .analysis import indexed_by, output_vars, reads_using
from .base import VECTOR_LANES, GSPNRule, static_extent

#: Elements of the contiguous inner loop of a task (rows shorter than this are grouped).
MIN_INNER = 4 * VECTOR_LANES


class Elementwise(GSPNRule):
    """Every block: producers inlined, the outer loops fused and run in parallel, the last loop
    (the output's contiguous axis) vectorized where every input reads it contiguously too.

    Applies to static-size functions whose blocks are all spatial (no reduction).
    """

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or any("R" in info.dom_kind() for info in infos):
            return None
        infos = try_inline(sch, infos)
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            if not loops or any(static_extent(sch.get(loop).extent) is None for loop in loops):
                return None
        for info in infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            stmt = sch.get(block)
            axes = output_vars(stmt)
            last = axes[-1] if axes else None
            contiguous = (
                last is not None and len(loops) == len(stmt.iter_vars)
                and stmt.iter_vars[-1].var.same_as(last)
                and all(indexed_by(r.region, (last,)) for r in reads_using(stmt, last))
            )
            extent = static_extent(sch.get(loops[-1]).extent)
            if contiguous and extent % VECTOR_LANES != 0 and _whole_rows(stmt, loops, axes, extent):
                # Rows that are not whole vectors (GSPN-T's 28-wide maps: a split of 1152 channels
                # at 28x28 ran at 13.7 GB/s against 57 GB/s at 56x56) but adjacent in every
                # buffer: one loop over the rows, vectorized across them.
                loops = [*loops[:-2], sch.fuse(*loops[-2:])]
                extent = static_extent(sch.get(loops[-1]).extent)
            if len(loops) > 1:
                sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
            if contiguous and extent % VECTOR_LANES == 0:
                _, inner = sch.split(loops[-1], [None, VECTOR_LANES])
                sch.vectorize(inner)
        return sch


def _whole_rows(stmt, loops, axes, width: int) -> bool:
    """Whether the block's last two loops walk the last two axes of its output and of every input
    that reads them, whole rows of ``width`` elements one after the other (so they fuse into one
    contiguous loop)."""
    if len(loops) < 2 or len(axes) < 2 or axes[-2] is None or len(stmt.iter_vars) < 2:
        return False
    row, col = axes[-2], axes[-1]
    if not stmt.iter_vars[-2].var.same_as(row):
        return False
    if static_extent(stmt.writes[0].source.shape[-1]) != width:
        return False
    reads = reads_using(stmt, col)
    return all(
        indexed_by(r.region, (row, col)) and static_extent(r.source.shape[-1]) == width for r in reads
    ) and len(reads_using(stmt, row)) == len(reads)
