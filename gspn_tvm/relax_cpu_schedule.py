"""CPU schedules for the operators Relax lowers around the scan (convolutions, norms, elementwise).

TVM's default CPU pipeline leaves legalized operators unscheduled: one thread, loops in TOPI's
order. ``cpu_pipeline`` is that pipeline with one more step after operator fusion, which gives every
unscheduled PrimFunc (the scan kernels are already scheduled and skipped) a simple schedule:

- producers that can be inlined (padding, casts) are inlined into their consumers;
- every remaining block runs its outer spatial loops in parallel;
- a reduction block (convolution, matmul) moves its innermost spatial loop inside the reduction
  loops, so that the inner loop walks the contiguous last axis of the output and of the input, which
  LLVM vectorizes (sizes are symbolic, so the vector body and its tail are left to LLVM);
- a reduction that is pointwise in the last two axes (a 1x1 convolution) runs one task per output
  channel with height and width fused into one contiguous inner loop (whole planes, not rows of
  ``width``); when its reduction is small (at most 64 input channels) the reduction is unrolled
  inside that loop, so each output element is stored once instead of once per input channel.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.relax.transform import AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR, LegalizeOps
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

logger = logging.getLogger(__name__)

#: Why each fusion fell back to the unfused module in this process (tests assert shipped models
#: never appear here).
fusion_fallbacks: list[str] = []


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


class ParallelLoops(CPUScheduleRule):
    """Parallel outer spatial loops; reductions with the contiguous spatial loop innermost."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
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


#: Fusion attempts before the unfused fallback (see :func:`fuse_operators`).
FUSION_ATTEMPTS = 8


def _with_new_vars(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every Relax function's variables replaced by fresh ones (same program)."""
    copy = tvm.IRModule({}, attrs=mod.attrs)
    for gvar, func in mod.functions.items():
        copy[gvar] = relax.utils.copy_with_new_vars(func) if isinstance(func, relax.Function) else func
    return copy


@tvm.transform.module_pass(opt_level=0, name="GSPNFuseOperators")
def fuse_operators(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Relax's ``FuseOps`` + ``FuseTIR``; the module unfused (with a logged warning) where ``FuseTIR`` fails.

    TVM 0.27's ``FuseTIR`` fails ("key is not in Map") on some modules with symbolic sizes, and
    whether it does depends on the addresses of the module's variables (a map ordered by pointer):
    the same model fails in about one process in two. Each retry runs on a copy of the module with
    fresh variables (the same program), which fails independently; after :data:`FUSION_ATTEMPTS`
    the model runs unfused, slower but correct. The reason is logged and kept in
    :data:`fusion_fallbacks`.
    """
    candidate = mod
    for attempt in range(1, FUSION_ATTEMPTS + 1):
        try:
            return FuseTIR()(FuseOps()(candidate))
        except (KeyError, tvm.error.InternalError) as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            reason = f"{type(error).__name__}: {lines[-1].strip()[:300] if lines else ''}"
            logger.debug("gspn_tvm: operator fusion attempt %d failed (%s)", attempt, reason)
            candidate = _with_new_vars(mod)
    fusion_fallbacks.append(reason)
    logger.warning(
        "gspn_tvm: operator fusion failed %d times (%s); the model runs unfused (slower, same results)",
        FUSION_ATTEMPTS, reason,
    )  # fmt: skip
    return mod


def legalize_passes() -> list:
    """``cpu_generic.legalize_passes`` with :func:`fuse_operators` for its fusion step."""
    return [LegalizeOps(), AnnotateTIROpPattern(), FoldConstant(), fuse_operators]


def schedule_passes(target: tvm.target.Target) -> list:
    """The scheduling step: :class:`ParallelLoops` on every PrimFunc not scheduled yet.

    (dlight's ``cpu.Reduction`` is not used: it also claims convolutions with an elementwise
    epilogue and then computes one output element per task.)
    """
    return [dlight.ApplyDefaultSchedule(ParallelLoops())]


def cpu_pipeline(target: tvm.target.Target):
    """TVM's default Relax CPU pipeline with :func:`schedule_passes` after operator fusion."""

    @tvm.transform.module_pass(opt_level=0, name="GSPNRelaxCPUPipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = (
                cpu_generic.library_dispatch_passes(target)
                + legalize_passes()
                + schedule_passes(target)
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


__all__ = ["ParallelLoops", "cpu_pipeline", "fusion_fallbacks", "schedule_passes"]
