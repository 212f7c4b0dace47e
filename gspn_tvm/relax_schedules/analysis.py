"""Block analysis the rules share: which block is the reduction, which iterators index what."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline

from .base import index_vars, static_extent, uses_var


def is_pad(sch: s_tir.Schedule, block) -> bool:
    """A padding block: spatial only, one read, with a bounds check (``if_then_else``)."""
    stmt = sch.get(block)
    return (
        all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars)
        and len(stmt.reads) == 1
        and bool(tvm.get_global_func("s_tir.schedule.HasIfThenElse")(stmt))
    )


def single_reduction(sch: s_tir.Schedule, keep_pad: bool):
    """``(reduction block, epilogue blocks)`` when the function is one static-size reduction block
    with spatial producers (inlined; padding kept when ``keep_pad``) and spatial epilogues; else None."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    if keep_pad:
        pads = [info for info in infos if is_pad(sch, info.block_rv)]
        rest = try_inline(sch, [info for info in infos if not is_pad(sch, info.block_rv)])
        infos = pads + rest
    else:
        infos = try_inline(sch, infos)
    reductions = [i for i, info in enumerate(infos) if "R" in info.dom_kind()]
    if len(reductions) != 1:
        return None
    position = reductions[0]
    block = infos[position].block_rv
    if any(static_extent(loop_extent) is None for loop_extent in (sch.get(l).extent for l in sch.get_loops(block))):
        return None
    producers = infos[:position]
    if keep_pad and not all(is_pad(sch, info.block_rv) for info in producers):
        return None
    if not keep_pad and producers:
        return None
    if any("R" in info.dom_kind() for info in infos[position + 1:]):
        return None
    return block, [info.block_rv for info in producers], [info.block_rv for info in infos[position + 1:]]


def iterators(stmt: s_tir.SBlock) -> tuple[list[tirx.Var], list[tirx.Var]]:
    """``(spatial vars, reduction vars)`` of a block."""
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduction = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    return spatial, reduction


def position(stmt: s_tir.SBlock, var: tirx.Var) -> int:
    """Index of ``var`` among the block's iterators (= its loop, for a block fresh from legalization)."""
    return next(i for i, iv in enumerate(stmt.iter_vars) if iv.var.same_as(var))


def output_vars(stmt: s_tir.SBlock) -> list[tirx.Var | None] | None:
    """Per axis of the single output: the spatial var indexing it (None for a constant index)."""
    if len(stmt.writes) != 1:
        return None
    return index_vars(stmt.writes[0].region)


def reads_using(stmt: s_tir.SBlock, var: tirx.Var) -> list:
    """Read regions (excluding the output's own read-back) whose indices depend on ``var``."""
    out = stmt.writes[0].source
    return [r for r in stmt.reads if not r.source.same_as(out) and uses_var(r.region, var)]


def indexed_by(region, variables) -> bool:
    """Whether the last axes of ``region`` are indexed by exactly ``variables``, in order."""
    found = index_vars(region)[-len(variables):]
    return len(found) == len(variables) and all(a is not None and a.same_as(b) for a, b in zip(found, variables))


def nchw_reduction(sch: s_tir.Schedule, keep_pad: bool):
    """``(block, pads, epilogues, (channel, row, col), reduction vars)`` for a function that is one
    static-size reduction block (see :func:`single_reduction`) with a 4-D output whose channel, row
    and column are spatial iterators (a convolution's NCHW output); else None."""
    found = single_reduction(sch, keep_pad=keep_pad)
    if found is None:
        return None
    block, pads, epilogues = found
    stmt = sch.get(block)
    axes = output_vars(stmt)
    if axes is None or len(axes) != 4 or any(v is None for v in axes[1:]):
        return None
    return block, pads, epilogues, (axes[1], axes[2], axes[3]), iterators(stmt)[1]


def loop_extent(sch: s_tir.Schedule, block, var: tirx.Var) -> int:
    """The extent of the loop that iterator ``var`` of a block fresh from legalization runs on (the
    functions the rules schedule have static sizes: see :func:`single_reduction`)."""
    return int(sch.get(sch.get_loops(block)[position(sch.get(block), var)]).extent)


def parallel_pads(sch: s_tir.Schedule, pads) -> None:
    """Padding stages kept apart (computed once, so that a convolution's inner loop reads without
    bounds checks) run their outer loops in parallel."""
    for pad in pads:
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
