"""Structural tests of the Relax CPU schedule rules (``gspn_tvm.relax_schedules``), on generated IR.

Each rule gets a PrimFunc legalized by Relax from one operator (what the pipeline hands it): the
rule's loop structure is checked in the scheduled TIR (parallel outer loop, vectorized inner loop,
unrolled register tile), the rule returns None where its pattern does not apply, and the scheduled
function computes what the unscheduled one does (no timing here).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir, tirx

from gspn_tvm.relax_schedules import (
    Conv1x1, DepthwiseConv, Elementwise, GSPNRule, Matmul, ParallelLoops, Reduction, SpatialConv, default_rules,
)
from gspn_tvm.relax_schedules import base
from gspn_tvm.relax_schedules.base import pick_vector_factor

TARGET = tvm.target.Target("llvm")


#: Parameter shapes of each PrimFunc made by :func:`legalized` (inputs, then the output).
SHAPES: dict[int, list] = {}


def relax_module(build, *shapes) -> tvm.IRModule:
    """A Relax module whose ``main`` takes float32 tensors of ``shapes`` and returns
    ``build(bb, *input vars)`` (``bb`` emits any intermediate bindings)."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(shape, "float32")) for i, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def legalized(build, *shapes) -> tirx.PrimFunc:
    """The one PrimFunc Relax's LegalizeOps makes of ``build(*input vars)``."""
    mod = relax.transform.LegalizeOps()(relax_module(lambda _, *params: build(*params), *shapes))
    funcs = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1
    SHAPES[id(funcs[0])] = list(shapes)
    return funcs[0]


def conv1x1_func(height=14, width=56, channels=48):
    return legalized(lambda x, w: relax.op.nn.conv2d(x, w), (1, channels, height, width), (24, channels, 1, 1))


def spatial_conv_func():
    return legalized(lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=1), (1, 8, 16, 16), (16, 8, 3, 3))


def depthwise_func():
    return legalized(lambda x, w: relax.op.nn.conv2d(x, w, padding=3, groups=8), (1, 8, 14, 14), (8, 1, 7, 7))


def matmul_func():
    return legalized(lambda a, b: relax.op.matmul(a, b), (4, 32), (32, 48))


def mean_func():
    return legalized(lambda x: relax.op.mean(x, axis=[1], keepdims=True), (1, 24, 14, 14))


def sigmoid_func():
    return legalized(lambda x: relax.op.sigmoid(x), (1, 24, 14, 16))


def block_loops(func: tirx.PrimFunc) -> dict[str, list[tirx.ForKind]]:
    """For every block of ``func``: the kinds of the loops around it, outermost first."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return {sch.get(b).name_hint: [sch.get(loop).kind for loop in sch.get_loops(b)] for b in blocks}


def kinds(func: tirx.PrimFunc) -> list[tirx.ForKind]:
    """The loop kinds of every block, concatenated."""
    return [kind for found in block_loops(func).values() for kind in found]


P, S, U, V = tirx.ForKind.PARALLEL, tirx.ForKind.SERIAL, tirx.ForKind.UNROLLED, tirx.ForKind.VECTORIZED


def scheduled(rule: GSPNRule, func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = rule.apply(func, TARGET, False)
    assert sch is not None, f"{type(rule).__name__} did not apply"
    return sch.mod["main"]


def run(func: tirx.PrimFunc, shapes: list, out_shape: list) -> np.ndarray:
    """The output of ``func`` on random inputs of ``shapes`` (NaN where it writes nothing)."""
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)
    rng = np.random.default_rng(0)
    arrays = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32")) for s in shapes]
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, dtype="float32"))
    lib(*arrays, out)
    return out.numpy()


def assert_same_results(rule: GSPNRule, func: tirx.PrimFunc, out_shape: list) -> None:
    """The rule's schedule computes what the fallback schedule of the same function does."""
    shapes = SHAPES[id(func)]
    expected = run(ParallelLoops().apply(func, TARGET, False).mod["main"], shapes, out_shape)
    actual = run(scheduled(rule, func), shapes, out_shape)
    assert not np.isnan(actual).any(), "the schedule left output elements unwritten"
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height, width", [(14, 56), (7, 7), (14, 14), (4, 28)])
def test_conv1x1_register_tile(height, width):
    func = scheduled(Conv1x1(), conv1x1_func(height, width))
    found = block_loops(func)
    # One parallel loop over (channel tile, pixel tile); the reduction over input channels; the
    # register tile: 8 channels unrolled x a vector of pixels.
    assert found["conv2d_nchw_update"] == [P, S, U, V]
    assert found["conv2d_nchw_init"] == [P, U, V]
    assert found["conv2d_nchw_local"][0] == P and found["conv2d_nchw_local"][-1] == V
    assert 'scope="local"' in func.script()
    assert_same_results(Conv1x1(), conv1x1_func(height, width), [1, 24, height, width])


@pytest.mark.parametrize(("channels", "side", "blocked"), [(192, 28, True), (48, 28, False), (40, 56, False)])
def test_conv1x1_sweeps_a_large_operand_in_blocks_of_vectors(channels, side, blocked):
    """When the pixels x input channels operand is over ``STREAMED_OPERAND_BYTES`` (192 x 28^2: 588
    KiB), the pixel vectors run in blocks (a split of the vector loop: three splits, not two) with
    the channel tiles inside each block, so the block's operand is reused from L2 by every tile;
    smaller operands (48 x 28^2, 40 x 56^2: 147 and 490 KiB) are swept whole. Same results either way."""
    func = legalized(lambda x, w: relax.op.nn.conv2d(x, w), (1, channels, side, side), (24, channels, 1, 1))
    sch = Conv1x1().apply(func, TARGET, False)
    splits = [inst for inst in sch.trace.insts if inst.kind.name == "Split"]
    assert len(splits) == (3 if blocked else 2), [str(i) for i in sch.trace.insts]
    if blocked:
        operand = channels * side * side * 4
        assert operand > base.STREAMED_OPERAND_BYTES, operand
    assert_same_results(Conv1x1(), func, [1, 24, side, side])


@pytest.mark.parametrize(("side", "channels_tile"), [(7, 4), (4, 6), (8, None), (14, None)])
def test_conv1x1_whole_map_tile_where_the_registers_hold_it(side, channels_tile):
    """With AVX-512's 32 registers, maps whose rows are one vector (7x7, 4x4) tile channels x every
    row (4 x 7, 6 x 4 accumulators; rows inside the reduction), others keep one vector of pixels
    per tile; same results (compiled for the baseline target)."""
    sch = Conv1x1().apply(conv1x1_func(side, side), tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"}), False)
    splits = [[int(v) for v in inst.inputs[2:]] for inst in sch.trace.insts if inst.kind.name == "Split"]
    print("split factors:", splits)
    if channels_tile is None:
        assert splits == [[pick_vector_factor([side, side])], [8]], splits
    else:
        assert splits == [[side], [side], [channels_tile]], splits  # rows, the row as the vector, channels
    shapes, out_shape = [[1, 48, side, side], [24, 48, 1, 1]], [1, 24, side, side]
    expected = run(ParallelLoops().apply(conv1x1_func(side, side), TARGET, False).mod["main"], shapes, out_shape)
    np.testing.assert_allclose(run(sch.mod["main"], shapes, out_shape), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("side", "channels", "claimed"), [(28, 16, False), (56, 32, False), (14, 8, False),
                                                          (112, 16, True), (56, 48, True), (28, 64, True)])
def test_shallow_reductions_go_to_the_fallback(side, channels, claimed):
    """Reductions over at most 32 input channels are left to the fallback (the reduction unrolled in
    one loop per channel) unless the pixels make 16-wide vectors (112 wide); the fallback computes
    the same, and SpatialConv does not take the pointwise convolution either."""
    func = conv1x1_func(side, side, channels)
    assert (Conv1x1().apply(func, TARGET, False) is not None) == claimed
    assert SpatialConv().apply(func, TARGET, False) is None
    if not claimed:
        rule = next(r for r in default_rules() if r.apply(func, TARGET, False) is not None)
        assert isinstance(rule, ParallelLoops), type(rule).__name__


def test_conv1x1_does_not_claim_other_patterns():
    for func in (spatial_conv_func(), depthwise_func(), matmul_func(), mean_func(), sigmoid_func()):
        assert Conv1x1().apply(func, TARGET, False) is None


def test_spatial_conv_keeps_padding_apart_and_tiles():
    func = scheduled(SpatialConv(), spatial_conv_func())
    found = block_loops(func)
    assert found["pad_temp"][0] == P  # a stage of its own, so the inner loop has no bounds checks
    # Reductions (channels, kernel rows, kernel columns), then the tile: output rows, 8 channels
    # unrolled, a whole output row vectorized.
    assert found["conv2d_nchw_update"] == [P, S, S, S, S, U, V]
    assert "if_then_else" not in func.script().split('sblock("conv2d_nchw_update")')[1]
    assert_same_results(SpatialConv(), spatial_conv_func(), [1, 16, 8, 8])


def test_spatial_conv_rows_per_tile_fit_the_registers():
    from gspn_tvm.relax_schedules.base import vector_registers
    from gspn_tvm.relax_schedules.spatial_conv import rows_per_tile

    assert rows_per_tile(14, 14, 32) == 2  # 8 channels x 2 rows x 2 vectors = 32 registers
    assert rows_per_tile(14, 14, 16) == 14  # no two rows fit 16: the L1 tile (8 x 14 x 14 <= 2048)
    assert rows_per_tile(8, 8, 32) == 4
    assert rows_per_tile(7, 7, 32) == 7  # 7 is prime: the L1 tile
    assert rows_per_tile(28, 28, 32) == 7  # four vectors a row: the L1 tile
    assert vector_registers(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})) == 32
    assert vector_registers(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})) == 16
    assert vector_registers(TARGET) == 16


@pytest.mark.parametrize(("mcpu", "rows_block"), [("x86-64-v4", 2), ("x86-64-v3", 14)])
def test_spatial_conv_register_tile_by_target(mcpu, rows_block):
    """A 28 -> 14 downsampling (rows of 14 outputs) gets tiles of 2 rows where AVX-512's 32
    registers hold them, all 14 rows in L1 elsewhere; same results (the schedule is compiled for the
    baseline target here, so that the test runs on any x86-64)."""
    def func():
        return legalized(lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=1), (1, 4, 28, 28), (16, 4, 3, 3))

    sch = SpatialConv().apply(func(), tvm.target.Target({"kind": "llvm", "mcpu": mcpu}), False)
    assert sch is not None
    splits = [inst for inst in sch.trace.insts if inst.kind.name == "Split"]
    print("split factors:", [[str(v) for v in inst.inputs[1:]] for inst in splits])
    assert int(splits[0].inputs[2]) == rows_block  # the output rows, first (ReductionPattern.rows)
    shapes, out_shape = [[1, 4, 28, 28], [16, 4, 3, 3]], [1, 16, 14, 14]
    expected = run(ParallelLoops().apply(func(), TARGET, False).mod["main"], shapes, out_shape)
    np.testing.assert_allclose(run(sch.mod["main"], shapes, out_shape), expected, rtol=1e-5, atol=1e-5)


def test_spatial_conv_leaves_depthwise_and_pointwise():
    assert SpatialConv().apply(depthwise_func(), TARGET, False) is None
    assert SpatialConv().apply(mean_func(), TARGET, False) is None


@pytest.mark.parametrize(("channels", "side", "kernel", "stride"), [(8, 14, 7, 1), (4, 7, 7, 1), (3, 56, 3, 1), (4, 12, 3, 2)])
def test_depthwise_conv_tiles_whole_rows_per_channel(channels, side, kernel, stride):
    """A task per channel and block of output rows; the taps (kernel rows and columns) outside the
    tile; output rows then a whole output row vectorized inside; padding a parallel stage of its
    own. 56 columns: blocks of rows of at most 2048 accumulators (28 rows of 56)."""
    def func():
        return legalized(lambda x, w: relax.op.nn.conv2d(x, w, strides=stride, padding=kernel // 2, groups=channels),
                         (1, channels, side, side), (channels, 1, kernel, kernel))  # fmt: skip

    scheduled_func = scheduled(DepthwiseConv(), func())
    found = block_loops(scheduled_func)
    update = next(k for k in found if k.endswith("_update"))
    assert found["pad_temp"][0] == P
    assert found[update] == [P, S, S, S, V], found
    assert "if_then_else" not in scheduled_func.script().split(f'sblock("{update}")')[1]
    out_side = (side + 2 * (kernel // 2) - kernel) // stride + 1
    assert_same_results(DepthwiseConv(), func(), [1, channels, out_side, out_side])


def test_depthwise_conv_leaves_dense_grouped_and_multiplied_convolutions():
    grouped = legalized(lambda x, w: relax.op.nn.conv2d(x, w, padding=1, groups=4), (1, 8, 14, 14), (8, 2, 3, 3))
    multiplied = legalized(lambda x, w: relax.op.nn.conv2d(x, w, padding=1, groups=4), (1, 4, 14, 14), (8, 1, 3, 3))
    for func in (spatial_conv_func(), conv1x1_func(), grouped, multiplied, matmul_func(), mean_func(), sigmoid_func()):
        assert DepthwiseConv().apply(func, TARGET, False) is None


def test_matmul_tiles_rows_and_vectorizes_columns():
    func = scheduled(Matmul(), matmul_func())
    assert block_loops(func)["matmul_update"] == [P, S, U, V]
    assert Matmul().apply(sigmoid_func(), TARGET, False) is None
    assert_same_results(Matmul(), matmul_func(), [4, 48])


def test_reduction_only_on_reductions():
    assert Reduction().apply(sigmoid_func(), TARGET, False) is None
    func = scheduled(Reduction(), mean_func())
    assert P in kinds(func)
    assert_same_results(Reduction(), mean_func(), [1, 1, 14, 14])


def test_elementwise_vectorizes_contiguous_rows():
    func = scheduled(Elementwise(), sigmoid_func())
    assert list(block_loops(func).values()) == [[P, S, V]]
    assert Elementwise().apply(mean_func(), TARGET, False) is None
    assert_same_results(Elementwise(), sigmoid_func(), [1, 24, 14, 16])


@pytest.mark.parametrize("side", [28, 14, 7])
def test_elementwise_fuses_adjacent_short_rows(side):
    """Rows that are not whole vectors but adjacent in every buffer (a channel split at 28x28) run as
    one vectorized loop over the plane (a slice of channels here, as a split's outputs are); a
    transpose (rows not adjacent in its input) is not fused. Same results."""
    split = legalized(lambda x: relax.op.strided_slice(x, axes=[1], begin=[2], end=[6]), (1, 8, side, side))
    found = list(block_loops(scheduled(Elementwise(), split)).values())
    plane = side * side
    expected = [P, S, V] if plane % 8 == 0 else [P, S]  # channels / the plane (in vectors)
    assert found == [expected] * len(found) and found, found
    assert_same_results(Elementwise(), split, [1, 4, side, side])
    transpose = legalized(lambda x: relax.op.permute_dims(x, [0, 1, 3, 2]), (1, 8, side, side))
    assert len(block_loops(scheduled(Elementwise(), transpose))["T_transpose"]) == 2


def test_symbolic_sizes_fall_through_to_parallel_loops():
    n = tirx.Var("n", "int64")
    func = legalized(lambda x, w: relax.op.nn.conv2d(x, w), (1, 16, n, n), (24, 16, 1, 1))
    for rule in default_rules()[:-1]:
        if not isinstance(rule, Reduction):
            assert rule.apply(func, TARGET, False) is None, type(rule).__name__
    assert P in kinds(scheduled(ParallelLoops(), func))


def test_vector_factor_never_straddles_rows():
    assert pick_vector_factor([14, 56]) == 8
    assert pick_vector_factor([14, 14]) == 14
    assert pick_vector_factor([7, 7]) == 7
    assert pick_vector_factor([4, 4]) == 16
    assert pick_vector_factor([28]) == 14


def test_failing_rule_is_logged_and_skipped(caplog):
    class Broken(GSPNRule):
        def schedule(self, func, target):
            sch = s_tir.Schedule(func)
            sch.get_sblock("no_such_block")
            return sch

    with caplog.at_level(logging.WARNING, logger="gspn_tvm.relax_schedules"):
        assert Broken().apply(sigmoid_func(), TARGET, False) is None
    assert any("rule Broken failed" in r.getMessage() and "no_such_block" in r.getMessage() for r in caplog.records)


def _strided_conv_module(side):
    """One 3x3 stride-2 padded convolution over (2, 8, side, side), ``side`` an int or symbolic."""
    return relax_module(lambda _, x, w: relax.op.nn.conv2d(x, w, strides=2, padding=1), (2, 8, side, side), (16, 8, 3, 3))


@pytest.mark.parametrize("symbolic", [False, True])
def test_strided_convolutions_become_im2col_and_a_1x1_convolution(symbolic):
    """With a symbolic size the rewrite leaves no strided convolution: one strided slice per kernel
    tap, stacked, and a 1x1 convolution over C*KH*KW channels; static sizes stay convolutions (the
    spatial rule takes them). The compiled module equals numpy's convolution either way, also at a
    side the symbolic module was not traced at."""
    from gspn_tvm.relax_cpu_schedule import cpu_pipeline, strided_convolutions_as_im2col

    mod = _strided_conv_module(tirx.Var("side", "int64") if symbolic else 9)
    text = strided_convolutions_as_im2col(mod).script(show_meta=False)
    if symbolic:
        assert text.count("R.strided_slice") == 9 and text.count("R.nn.conv2d") == 1
        assert "strides=[1, 1]" in text and "R.Tensor((16, 72, 1, 1)" in text
    else:
        assert "strided_slice" not in text and "strides=[2, 2]" in text
    executable = tvm.compile(mod, target=TARGET, relax_pipeline=cpu_pipeline(TARGET))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(0)
    for side in ([9, 14] if symbolic else [9]):
        x, w = rng.standard_normal((2, 8, side, side), "float32"), rng.standard_normal((16, 8, 3, 3), "float32")
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out_side = (side - 1) // 2 + 1
        expected = np.zeros((2, 16, out_side, out_side), "float32")
        for a in range(3):
            for b in range(3):
                taps = padded[:, :, a : a + 2 * out_side - 1 : 2, b : b + 2 * out_side - 1 : 2]
                expected += np.einsum("nchw,oc->nohw", taps, w[:, :, a, b])
        got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
        print(side, np.abs(got - expected).max())
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_im2col_leaves_unstrided_and_grouped_convolutions():
    from gspn_tvm.relax_cpu_schedule import strided_convolutions_as_im2col

    def build(bb, x, w, dw):
        y = bb.emit(relax.op.nn.conv2d(x, w, strides=1, padding=1))
        return relax.op.nn.conv2d(y, dw, strides=2, padding=1, groups=8)

    mod = relax_module(build, (1, 8, 12, 12), (8, 8, 3, 3), (8, 1, 3, 3))
    text = strided_convolutions_as_im2col(mod).script(show_meta=False)
    assert text.count("R.nn.conv2d") == 2 and "strided_slice" not in text


def test_reshapes_are_views_not_copy_kernels():
    """A reshape, also of a tensor sized by an expression of the symbolic image side (GSPN-T's
    reshapes after its strided convolutions), is a view in the compiled model: no copy kernel."""
    from gspn_tvm.relax_cpu_schedule import cpu_pipeline

    def build(bb, x, w):
        y = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=1))
        half = y.ty.shape.values[2]  # (side - 1) // 2 + 1
        z = bb.emit(relax.op.reshape(relax.op.add(y, y), (1, 4, 16 * half, half)))
        return relax.op.multiply(z, z)

    side = tirx.Var("side", "int64")
    mod = relax_module(build, (1, 64, side, side), (64, 64, 3, 3))
    main = cpu_pipeline(TARGET)(mod)["main"].script(show_meta=False)
    copies = [line.strip()[:120] for line in main.splitlines() if "reshape" in line and "vm.builtin.reshape" not in line]
    print(copies)
    assert "vm.builtin.reshape" in main and not copies
