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


def _static_ints(shape) -> list[int] | None:
    values = [v.value if isinstance(v, tvm.tirx.IntImm) else None for v in shape.values] if shape is not None else None
    return None if values is None or None in values else values


@relax.expr_functor.mutator
class _StridedConvolutionsAsIm2Col(relax.PyExprMutator):
    """Strided dense convolutions (NCHW, OIHW, groups 1, dilation 1, stride > 1, static kernel,
    symbolic data size) as
    an im2col gather (pad, one strided slice per kernel tap, stacked after the channel axis) and a
    1x1 convolution over ``C * KH * KW`` channels, whose schedule rule runs at several times the
    speed of the rule for spatial kernels: GSPN-T's stem and downsampling convolutions (3x3, stride
    2, compiled for any image size, so with symbolic sizes that the spatial-convolution rule does not
    take) ran at 8-13 GFLOP/s, 20-33 ms each at 224x224, against about 80 GFLOP/s for its 1x1
    convolutions: GSPN-T compiled for any size 291 -> 197 ms. Only for symbolic sizes: with static
    ones the spatial-convolution rule is a little faster (161 vs 166 ms). The gathered tensor is
    ``KH * KW / (SH * SW)`` times the input (9/4 for GSPN-T)."""

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        rewritten = self._im2col(call)
        return call if rewritten is None else rewritten

    def _im2col(self, call):
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return None
        attrs, (x, w) = call.attrs, call.args
        if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or int(attrs.groups) != 1
                or [int(d) for d in attrs.dilation] != [1, 1] or str(x.ty.dtype) != "float32"):  # fmt: skip
            return None
        strides = [int(v) for v in attrs.strides]
        kernel = _static_ints(w.ty.shape)
        if max(strides) < 2 or kernel is None or x.ty.shape is None or call.ty.shape is None:
            return None
        if _static_ints(x.ty.shape) is not None:
            return None  # static sizes: the spatial-convolution rule (GSPN-T 161 ms, im2col 166 ms)
        (o, i, kh, kw), (n, c) = kernel, list(x.ty.shape.values[:2])
        oh, ow = list(call.ty.shape.values[2:])  # symbolic where the model's image size is
        top, left, bottom, right = (int(v) for v in attrs.padding)
        emit = self.builder_.emit
        padded = emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right])) if top or left or bottom or right else x
        # Each tap is (n, c, oh, ow); Relax cannot infer that for symbolic sizes, so it is asserted.
        tap_type = relax.TensorType([n, c, oh, ow], x.ty.dtype)
        taps = [self.builder_.match_cast(relax.op.strided_slice(padded, axes=[2, 3], begin=[a, b],
                                                                end=[a + strides[0] * (oh - 1) + 1, b + strides[1] * (ow - 1) + 1],
                                                                strides=strides), tap_type)  # fmt: skip
                for a in range(kh) for b in range(kw)]
        columns = emit(relax.op.reshape(emit(relax.op.stack(taps, axis=2)), (n, c * kh * kw, oh, ow)))
        weights = emit(relax.op.reshape(w, (o, i * kh * kw, 1, 1)))
        return relax.op.nn.conv2d(columns, weights, out_layout=attrs.out_layout, out_dtype=attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="GSPNStridedConvolutionsAsIm2Col")
def strided_convolutions_as_im2col(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Every Relax function of ``mod`` with its strided dense convolutions rewritten as im2col and a
    1x1 convolution (see :class:`_StridedConvolutionsAsIm2Col`); the same results."""
    rewriter = _StridedConvolutionsAsIm2Col(mod)
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


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


def _reshape_as_view(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``R.reshape`` left as it is: the VM lowers it to a view (every Relax tensor is dense), where
    legalized it is a copy kernel that ``RewriteDataflowReshape`` must recognize to undo, which TVM
    0.27 fails to for sizes that are expressions of a symbolic size (39 of GSPN-T's 57 reshapes,
    up to 6.5 ms each)."""
    return call


def _fast_math_map() -> dict:
    return {
        "relax.sigmoid": _float32_only(_fast_sigmoid, "relax.sigmoid"),
        "relax.nn.gelu": _float32_only(_fast_gelu, "relax.nn.gelu"),
        "relax.reshape": _reshape_as_view,
    }


def legalize_passes() -> list:
    """``cpu_generic.legalize_passes`` with :func:`fuse_operators` for its fusion step, and float32
    sigmoid and GELU legalized with TOPI's vectorizable ``fast_exp`` and ``fast_erf``."""
    return [strided_convolutions_as_im2col, LegalizeOps(customize_legalize_map=_fast_math_map()), AnnotateTIROpPattern(),
            FoldConstant(), fuse_operators]  # fmt: skip


def cpu_pipeline(target: tvm.target.Target):
    """TVM's default Relax CPU pipeline with :func:`schedule_passes` after operator fusion."""

    @tvm.transform.module_pass(opt_level=0, name="GSPNRelaxCPUPipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = (
                cpu_generic.library_dispatch_passes(target)
                + legalize_passes()
                # Also before the schedule rules: a scheduled kernel no longer matches the pattern
                # that turns reshape-like kernels (flatten, squeeze, expand_dims) into views.
                + [relax.transform.RewriteDataflowReshape()]
                + schedule_passes(target)
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


__all__ = ["ParallelLoops", "cpu_pipeline", "fusion_fallbacks", "fuse_operators", "schedule_passes"]
