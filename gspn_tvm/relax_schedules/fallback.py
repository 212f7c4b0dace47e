"""The rule of last resort: parallel outer loops and a contiguous inner loop, for any sizes.

It schedules what no earlier rule claimed: functions with symbolic sizes (depthwise convolutions among them),
reductions over non-contiguous axes, layout changes. Every block runs its outer spatial loops in
parallel; a reduction block (convolution, matmul) moves its innermost spatial loop inside the
reduction loops, so that the inner loop walks the contiguous last axis of the output and of the
input, which LLVM vectorizes (sizes may be symbolic, so the vector body and its tail are left to
LLVM); a reduction that is pointwise in the last two axes (a 1x1 convolution) runs one task per
output channel with height and width fused into one contiguous inner loop; when its reduction is
small (at most 64 input channels) the reduction is unrolled inside that loop, so that each output
element is stored once instead of once per input channel.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline

from .base import GSPNRule


def _innermost_axis_var(block: s_tir.SBlock) -> tirx.Var | None:
    """The block iterator that indexes the last axis of the block's (first) output, if it is one var."""
    if not block.writes:
        return None
    last = block.writes[0].region[-1].min
    return last if isinstance(last, tirx.Var) else None


def _rows_contiguous(block: s_tir.SBlock, kinds: str) -> bool:
    """Whether the last two spatial iterators index the last two axes of the output, and every read
    buffer either at its last two axes the same way or not at all (weights), so that the two loops
    can be fused into one loop over contiguous memory."""
    spatial_vars = [iv.var for iv, kind in zip(block.iter_vars, kinds) if kind == "S"]
    if len(spatial_vars) < 2 or not block.writes or len(block.writes) != 1:
        return False
    row, col = spatial_vars[-2], spatial_vars[-1]

    def matches(region) -> bool:
        if len(region) < 2:
            return False
        a, b = region[-2], region[-1]
        return (isinstance(a.min, tirx.Var) and a.min.same_as(row) and isinstance(b.min, tirx.Var)
                and b.min.same_as(col) and int(getattr(a.extent, "value", -1)) == 1
                and int(getattr(b.extent, "value", -1)) == 1)

    def uses(expr) -> bool:
        return any(v.same_as(row) or v.same_as(col) for v in tirx.analysis.undefined_vars(expr))

    if not matches(block.writes[0].region):
        return False
    for read in block.reads:
        if matches(read.region):
            continue
        if any(uses(r.min) or uses(r.extent) for r in read.region):
            return False
    return True


def _product(extents) -> int:
    result = 1
    for extent in extents:
        result *= int(extent.value)
    return result


class ParallelLoops(GSPNRule):
    """Parallel outer spatial loops; reductions with the contiguous spatial loop innermost."""

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target):
        sch = s_tir.Schedule(func)
        block_infos = normalize_prim_func(sch)
        if block_infos is None:
            return None
        block_infos = try_inline(sch, block_infos)
        for info in block_infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            if not loops or any(sch.get(loop).kind != tirx.ForKind.SERIAL for loop in loops):
                continue
            kinds = info.dom_kind()
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
            reduction = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
            if len(spatial) + len(reduction) != len(loops) or not spatial:
                continue
            inner = None
            if reduction and len(spatial) >= 2:
                stmt = sch.get(block)
                last_var = _innermost_axis_var(stmt)
                last_iter = stmt.iter_vars[kinds.rfind("S")].var if "S" in kinds else None
                if last_var is not None and last_iter is not None and last_var.same_as(last_iter):
                    inner = spatial[-1]
            outer = spatial[:-1] if inner is not None else spatial
            if inner is not None:
                if len(outer) >= 2 and _rows_contiguous(sch.get(block), kinds):
                    # Pointwise in the last two axes (a 1x1 convolution): one long contiguous inner
                    # loop over whole planes instead of short rows.
                    row = outer.pop()
                    extents = [sch.get(loop).extent for loop in reduction]
                    if all(isinstance(e, tirx.IntImm) for e in extents) and _product(extents) <= 64:
                        # Few input channels: the whole reduction unrolled inside the plane loop,
                        # so that each output element is loaded and stored once.
                        sch.reorder(*outer, row, inner, *reduction)
                        sch.fuse(row, inner)
                        for loop in reduction:
                            sch.unroll(loop)
                        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
                        sch.decompose_reduction(block, reduction[0])
                        continue
                    sch.reorder(*outer, *reduction, row, inner)
                    inner = sch.fuse(row, inner)
                else:
                    sch.reorder(*outer, *reduction, inner)
            # Leave one loop outside the parallel region when there are several, so that the tasks
            # are whole rows (or planes), not single elements.
            parallel_loops = outer[:-1] if len(outer) > 1 and inner is None and not reduction else outer
            if parallel_loops:
                sch.parallel(sch.fuse(*parallel_loops) if len(parallel_loops) > 1 else parallel_loops[0])
            if reduction:
                sch.decompose_reduction(block, reduction[0])
        return sch
