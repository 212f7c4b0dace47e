"""The Relax CPU pipeline: TVM's default one, with operator fusion that survives TVM 0.27's FuseTIR
bug and the schedule rules of :mod:`gspn_tvm.relax_schedules` after fusion.

TVM's default CPU pipeline leaves legalized operators unscheduled (one thread, loops in TOPI's
order). :func:`cpu_pipeline` adds :func:`~gspn_tvm.relax_schedules.schedule_passes` after fusion:
one dlight rule per pattern (1x1 and dense convolutions, matmul, reductions, elementwise, and a
fallback for anything else), the first that applies schedules each PrimFunc (the scan kernels are
already scheduled and skipped).
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, topi
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.relax.transform import AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR, LegalizeOps

from .relax_schedules import ParallelLoops, schedule_passes

logger = logging.getLogger(__name__)

#: Why each fusion fell back to the unfused module in this process (tests assert shipped models
#: never appear here).
fusion_fallbacks: list[str] = []


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


def _fast_sigmoid(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``1 / (1 + exp(-x))`` with TOPI's vectorizable polynomial ``fast_exp`` (LLVM lowers the exact
    ``exp`` of a vector to one libm call per lane)."""
    one = tvm.tirx.const(1.0, "float32")
    return bb.call_te(lambda x: one / (one + topi.fast_exp(-x)), call.args[0], primfunc_name_hint="tir_sigmoid")


def _fast_gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``x / 2 * (1 + erf(x / sqrt(2)))`` with TOPI's rational ``fast_erf`` (vectorizable)."""

    def gelu(x):
        half, one, root_half = (tvm.tirx.const(v, "float32") for v in (0.5, 1.0, 0.5**0.5))
        return half * x * (one + topi.fast_erf(x * root_half))

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _float32_only(fast, op_name: str):
    """``fast`` for float32 calls; other dtypes keep Relax's own legalization."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return fast(bb, call) if str(call.args[0].ty.dtype) == "float32" else default(bb, call)

    return legalize


def _fast_math_map() -> dict:
    return {
        "relax.sigmoid": _float32_only(_fast_sigmoid, "relax.sigmoid"),
        "relax.nn.gelu": _float32_only(_fast_gelu, "relax.nn.gelu"),
    }


def legalize_passes() -> list:
    """``cpu_generic.legalize_passes`` with :func:`fuse_operators` for its fusion step, and float32
    sigmoid and GELU legalized with TOPI's vectorizable ``fast_exp`` and ``fast_erf``."""
    return [LegalizeOps(customize_legalize_map=_fast_math_map()), AnnotateTIROpPattern(), FoldConstant(), fuse_operators]


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


__all__ = ["ParallelLoops", "cpu_pipeline", "fusion_fallbacks", "fuse_operators", "schedule_passes"]
