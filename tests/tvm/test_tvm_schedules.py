"""Structure of the CPU column-scan kernels, and the workspace they keep after a call (issue 8).

Column scans (``l2r``, ``r2l``) stage ``TILE_LINES`` columns at a time through transposed tiles
declared inside the tile block (:func:`gspn_tvm.compute.scan_forward_column_tiles`): every staged
buffer holds ``TILE_LINES * (H + TILE_PAD)`` elements (the weight gradients three of them), none
grows with ``W``, ``B`` or ``C``, and global memory is read and written row by row.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tvm import s_tir, tirx

from gspn_tvm import compute
from gspn_tvm.schedules import cpu

SCHEDULES = {"forward": cpu.schedule_forward, "backward": cpu.schedule_backward}
#: Buffers staged per tile: forward x, lam, gl, gm, gr, h; backward gl, gm, gr, the weight gradients,
#: gh, x, lam, the predecessor's h, dx, dlam.
STAGED = {"forward": 6, "backward": 10}
#: Copies of the rows and columns of a tile beyond a multiple of ``compute.V`` (element by element).
COPY_TAILS = {
    "forward": ("stage_in_rows_tail", "stage_in_cols_tail", "stage_out_rows_tail", "stage_out_cols_tail"),
    "backward": ("stage_weights_rows_tail", "stage_weights_cols_tail", "stage_in_rows_tail", "stage_in_cols_tail",
                 "stage_predecessor_cols_tail", "stage_out_rows_tail", "stage_out_cols_tail",
                 "store_weight_grad_rows_tail", "store_weight_grad_cols_tail"),
}
#: Copies of whole 8x8 blocks: one loop nest per tensor (a loop copying a block of every tensor
#: spilled its pointers and touched 40 pages per block at 1024 columns: twice as slow).
BLOCK_COPIES = {
    "forward": ["stage_in_8x8_x", "stage_in_8x8_lam", "stage_in_8x8_wl", "stage_in_8x8_wm", "stage_in_8x8_wr",
                "stage_out_8x8"],
    "backward": ["stage_weights_8x8_gl", "stage_weights_8x8_gm", "stage_weights_8x8_gr", "stage_in_8x8_gh",
                 "stage_in_8x8_x", "stage_in_8x8_lam", "stage_predecessor_8x8", "stage_out_8x8_dx",
                 "stage_out_8x8_dlam", "store_weight_grad_8x8_dgl", "store_weight_grad_8x8_dgm",
                 "store_weight_grad_8x8_dgr"],
}


class _Blocks:
    """Block name -> block statement of a scheduled PrimFunc."""

    def __init__(self, func):
        self._sch = s_tir.Schedule(func)

    def __getitem__(self, name: str):
        return self._sch.get(self._sch.get_sblock(name))


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_column_tiles_are_declared_inside_the_tile_block(direction, pass_):
    func = SCHEDULES[pass_](direction, "float32")
    blocks = _Blocks(func)
    tile_buffers = blocks["tile"].alloc_buffers
    assert len(tile_buffers) == STAGED[pass_], [b.name for b in tile_buffers]
    for buffer in tile_buffers:
        shape = list(buffer.shape)
        lines = cpu.TILE_LINES if pass_ == "forward" else cpu.BACKWARD_TILE_LINES
        assert [int(d) for d in shape[:-1]] in ([lines], [3, lines]), f"{buffer.name}: {shape}"
        assert str(shape[-1]).replace(" ", "") == f"H+T.int64({compute.TILE_PAD})", f"{buffer.name}: rows of {shape[-1]}"
    task = blocks["plane" if pass_ == "forward" else "slice"]
    for buffer in task.alloc_buffers:  # the carried state: one line (per channel of the group) only
        assert "W" not in str(list(buffer.shape)), f"{buffer.name} grows with W: {list(buffer.shape)}"
    # global memory row by row: the innermost loop of every copy runs over the tile's columns
    for name in COPY_TAILS[pass_]:
        block = blocks[name]
        assert [iv.var.name for iv in block.iter_vars][-1] in ("vk", "vm"), name


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_tiles_are_copied_in_register_blocks_of_constant_shape(direction, pass_):
    """The column tiles move whole 8x8 blocks: per tensor 8 vector loads along rows, a transpose in
    registers (two-operand shuffles) and 8 vector stores along the other axis, with no loop and no
    buffer in between (a copy over symbolic extents stays scalar: LLVM vectorizes it only under a
    stride check that never holds); the rest of the tile goes through the scalar tail blocks."""
    func = SCHEDULES[pass_](direction, "float32")
    blocks = _Blocks(func)
    copies = sorted(set(re.findall(r'T\.sblock\("(\w*_8x8\w*)"\)', func.script())))
    assert copies == sorted(BLOCK_COPIES[pass_]), copies
    for name in BLOCK_COPIES[pass_]:
        tensors = 1
        block = blocks[name]
        assert [iv.var.name for iv in block.iter_vars] == ["vib", "vkb"], name
        assert not block.alloc_buffers, f"{name}: {[b.name for b in block.alloc_buffers]}"
        script = block.script()
        assert "for " not in script, f"{name}: loops inside the block\n{script}"
        # 8 vector stores per tensor, each of a 3-level shuffle tree over 8 vector loads (7 shuffles per
        # stored vector in the TIR: the tree is written out per store, LLVM merges the shared levels)
        assert script.count("] = T.Shuffle(") == compute.V * tensors, f"{name}: vector stores\n{script}"
        assert script.count("T.Shuffle(") == 7 * compute.V * tensors, f"{name}: {script.count('T.Shuffle(')} shuffles"


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_column_scans_are_parallel_over_tasks(direction):
    for pass_, schedule in SCHEDULES.items():
        script = schedule(direction, "float32").script()
        assert "T.parallel(" in script, f"{pass_}: tasks not parallel"


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_tile_copies_prefetch_the_rows_ahead(direction, pass_):
    """Every copy of input blocks into a column tile prefetches, in every other block (one cache line
    per row once), the same columns of the 8 rows ``TILE_ROWS_AHEAD`` further, clamped to the
    tensor's last row; into the L2 only (locality 2) where rows are a multiple of ``L1_WAY_BYTES``
    apart, else into every level (3). The copies back to memory prefetch nothing."""
    func = SCHEDULES[pass_](direction, "float32")
    blocks = _Blocks(func)
    stage_in = [name for name in BLOCK_COPIES[pass_] if name.startswith(("stage_in", "stage_weights", "stage_predecessor"))]
    assert stage_in, BLOCK_COPIES[pass_]
    for name in stage_in:
        script = blocks[name].script()
        prefetches = re.findall(r'T\.call_llvm_intrin\("void", "llvm\.prefetch", T\.address_of\((.*)\), 0, (\d), 1\)', script)
        assert len(prefetches) == 2 * compute.V, f"{name}: {len(prefetches)} prefetches\n{script}"
        assert sorted({locality for _, locality in prefetches}) == ["2", "3"], name
        for a in range(compute.V):
            row = f"vib * T.int64(8) + T.int64({compute.TILE_ROWS_AHEAD})" + (f" + T.int64({a})" if a else "")
            assert sum(f"T.min({row}, (B * " in address for address, _ in prefetches) == 2, f"{name}: row {a}"
        assert f"* T.int64(4) % T.int64({compute.L1_WAY_BYTES}) == T.int64(0)" in script, script
        assert f"% T.int64({2 * compute.V}) == T.int64(0)" in script, script
    for name in set(BLOCK_COPIES[pass_]) - set(stage_in):
        assert "llvm.prefetch" not in blocks[name].script(), name


@pytest.mark.parametrize("direction", ["t2b", "l2r"])
@pytest.mark.parametrize("fused", [False, True])
def test_lane_kernels_run_whole_vectors_of_channels(direction, fused):
    """The small-plane kernels: one parallel task per (b, 16 channels); staged buffers of ``(H * W,
    LANES)`` float32 (never W- or C-sized beyond the plane); every loop over the lanes of the line
    blocks vectorized by TVM (no scalar tail); planes moved in 8x8 blocks of vector loads, shuffles
    and vector stores."""
    schedule = cpu.schedule_fused_forward_lanes if fused else cpu.schedule_forward_lanes
    func = schedule(direction, "float32")
    blocks = _Blocks(func)
    sch = s_tir.Schedule(func)
    assert [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock("lanes"))] == [tirx.ForKind.PARALLEL]
    staged = blocks["lanes"].alloc_buffers
    assert len(staged) == (8 if fused else 6) + 2, [b.name for b in staged]
    for buffer in staged:
        assert int(buffer.shape[-1]) == compute.LANES and "C" not in str(list(buffer.shape)), buffer
    for name in ("step", "ends", "carry", "emit", "clear") + (("gate",) if fused else ()):
        kinds = [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock(name))]
        assert kinds[-1] == tirx.ForKind.VECTORIZED, f"{name}: {kinds}"
    tensors = ["x", "lam", "wl", "wm", "wr"] + (["gate", "skip"] if fused else [])
    copies = sorted(set(re.findall(r'T\.sblock\("(lanes_stage_in_8x8\w*)"\)', func.script())))
    assert copies == sorted(f"lanes_stage_in_8x8_{t}" for t in tensors), copies  # one loop per tensor
    for name in copies:
        script = blocks[name].script()
        assert script.count("] = T.Shuffle(") == compute.LANES, script  # two halves of 8 lanes
        assert "for " not in script, script


def test_lane_adjoint_runs_whole_vectors_of_channels():
    """The lane adjoint: one parallel task per (b, 16 channels), the seven inputs staged in 8x8
    blocks, every per-line block vectorized over the lanes."""
    func = cpu.schedule_backward_lanes("r2l", "float32")
    sch = s_tir.Schedule(func)
    assert [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock("lanes"))] == [tirx.ForKind.PARALLEL]
    for name in ("load_previous_h", "adjoint_step", "gradients", "flow", "clear"):
        kinds = [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock(name))]
        assert kinds[-1] == tirx.ForKind.VECTORIZED, f"{name}: {kinds}"
    copies = sorted(set(re.findall(r'T\.sblock\("(lanes_stage_(?:in|out)_8x8\w*)"\)', func.script())))
    assert copies == sorted([f"lanes_stage_in_8x8_{t}" for t in ("gh", "x", "lam", "gl", "gm", "gr", "h")]
                            + [f"lanes_stage_out_8x8_{t}" for t in ("dx", "dlam", "dgl", "dgm", "dgr")]), copies
    for name in copies:
        stage = _Blocks(func)[name].script()
        assert stage.count("] = T.Shuffle(") == compute.LANES, stage


def test_projected_lane_kernel_computes_its_projections_in_vectors():
    """The lane kernel that projects its inputs from a proxy: the six sums per element are one
    vectorized block over the lanes, a proxy of S channels giving S terms each, and it stages only
    ``u`` from memory (5 staged inputs fewer than the fused lane kernel)."""
    func = cpu.schedule_fused_forward_lanes_projected("l2r", "float32", 3)
    sch = s_tir.Schedule(func)
    kinds = [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock("project"))]
    assert kinds[-1] == tirx.ForKind.VECTORIZED, kinds
    project = _Blocks(func)["project"].script()
    assert project.count("] * T.Cast(\"float32\", proxy[") == 6 * 3, project
    stage = _Blocks(func)["lanes_stage_in_8x8"].script()
    assert stage.count("] = T.Shuffle(") == compute.LANES, stage


WORKSPACE = """
import ctypes, gc, json, sys, torch
from gspn_tvm import kernels, soak
trim = ctypes.CDLL("libc.so.6").malloc_trim
H, W = 1024, 1024
x, lam = torch.randn(2, 1, 2, H, W)
gl, gm, gr = torch.rand(3, 1, 2, H, W) / 3
tiny = [t[..., :8, :8].contiguous() for t in (x, lam, gl, gm, gr)]
rows = {}
for direction in ("l2r", "r2l", "t2b"):
    kernels.scan_forward(*tiny, direction, 0), kernels.scan_backward(tiny[0], *tiny, tiny[0], direction, 0)
    gc.collect(); trim(0); base = soak.resident_bytes()
    h = kernels.scan_forward(x, lam, gl, gm, gr, direction, 0)
    del h; gc.collect(); trim(0)
    forward = soak.resident_bytes() - base
    grads = kernels.scan_backward(x, x, lam, gl, gm, gr, x, direction, 0)
    del grads; gc.collect(); trim(0)
    rows[direction] = [forward, soak.resident_bytes() - base]
print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs glibc's malloc_trim and /proc")
def test_workspace_kept_after_a_call_is_bounded_by_the_tiles():
    """After one call at (1, 2, 1024, 1024) the process keeps at most the tiles of one task per
    thread and pass (forward 6 x 128 x 1040, adjoint 12 x 64 x 1040 float32: 3.05 MiB each; the
    adjoint is measured after the forward, so both count), not plane-sized staging (before: 6x the data, 50+ MiB
    here). glibc's free memory is returned first (malloc_trim), so what is left is held by TVM."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(WORKSPACE)], capture_output=True, text=True,
                            cwd=root, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(out)
    per_thread = (6 * cpu.TILE_LINES + 12 * cpu.BACKWARD_TILE_LINES) * (1024 + compute.TILE_PAD) * 4
    bound = out["threads"] * per_thread + 2 * 2**20
    for direction, (forward, backward) in out["rows"].items():
        assert forward <= bound and backward <= bound, f"{direction}: kept {forward} / {backward} bytes, bound {bound}"


# --- Row scans: the position loops are vectorized by TVM, in both directions ------------------------

ROW_FORWARDS = {"scan": cpu.schedule_forward, "fused": cpu.schedule_fused_forward}


def _compiled_ir(func) -> str:
    """LLVM IR of ``func`` compiled for this machine's CPU target, after LLVM's optimizations."""
    import tvm

    from gspn_tvm import build

    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(build.cpu_target()))
    return executable.mod.inspect_source("ll")


@pytest.mark.parametrize("direction", ["t2b", "b2t"])
@pytest.mark.parametrize("operator", ["scan", "fused"])
def test_row_position_loops_are_vectorized_by_tvm(operator, direction):
    """The loops that read the inputs (``step``) and write the output (``emit``) end in a TVM vector
    loop of ``VECTOR_LANES`` lanes, in both row directions."""
    sch = s_tir.Schedule(ROW_FORWARDS[operator](direction, "float32"))
    for name in cpu.ROW_VECTOR_BLOCKS:
        innermost = sch.get(sch.get_loops(sch.get_sblock(name))[-1])
        assert innermost.kind == tirx.ForKind.VECTORIZED, (name, innermost.kind)
        assert int(innermost.extent) == cpu.VECTOR_LANES, (name, innermost.extent)


@pytest.mark.parametrize("operator", ["scan", "fused"])
def test_bottom_to_top_rows_compile_to_the_vector_code_of_top_to_bottom(operator):
    """``b2t`` visits rows with a negative stride. LLVM's own loop vectorizer guarded its vector loop
    with run-time overlap checks hoisted out of the row loop plus a test that the row stride is not
    negative (``%stride.check``): always true for ``b2t``, whose every row then ran the scalar loop.
    Neither direction may carry such a check, and both must load as many 8-float vectors."""
    ir = {d: _compiled_ir(ROW_FORWARDS[operator](d, "float32")) for d in ("t2b", "b2t")}
    for direction, text in ir.items():
        guards = re.findall(r"%stride\.check\d* = ", text)
        assert not guards, f"{direction}: {len(guards)} stride guards send the vector loop to its scalar fallback"
    vector_loads = {d: len(re.findall(r"load <8 x float>", text)) for d, text in ir.items()}
    assert vector_loads["t2b"] > 0 and vector_loads["t2b"] == vector_loads["b2t"], vector_loads


# --- Rows visited bottom to top: tasks in descending order, lines prefetched ahead ------------------

ROW_KERNELS = {"forward": cpu.schedule_forward, "fused": cpu.schedule_fused_forward, "backward": cpu.schedule_backward}
#: (task block, direction that descends) per kernel: the forward ``b2t`` and the adjoint of ``t2b``
#: visit rows bottom to top.
DESCENDING = {"forward": ("plane", "b2t"), "fused": ("plane", "b2t"), "backward": ("slice", "t2b")}
#: Prefetch blocks of a descending kernel: streams read, streams written (one prefetch each).
ROW_PREFETCHES = {
    "forward": {"prefetch_ahead": (5, 1)},
    "fused": {"prefetch_ahead": (7, 1)},
    "backward": {"prefetch_slice_ahead": (3, 3), "prefetch_channel_ahead": (4, 2)},
}


def _prefetches(script: str) -> tuple[int, int]:
    """(reads, writes) among the ``llvm.prefetch`` calls of ``script`` (rw flag 0 / 1)."""
    calls = re.findall(r'"llvm\.prefetch".*\]\), ([01]), 3, 1\)$', script, flags=re.MULTILINE)
    return calls.count("0"), calls.count("1")


@pytest.mark.parametrize("pass_", ["forward", "fused", "backward"])
def test_rows_visited_bottom_to_top_run_descending_tasks_and_prefetch_lines_ahead(pass_):
    """The descending row kernels: the fused task loop runs the tasks last to first (so a thread's run
    of planes is one descending stream), and every line prefetches each stream it reads and writes
    ``LINE_PREFETCH_AHEAD`` lines further in visit order (the next rows up)."""
    task, direction = DESCENDING[pass_]
    func = ROW_KERNELS[pass_](direction, "float32")
    blocks = _Blocks(func)
    script = func.script()
    assert re.search(r"vb = T\.axis\.spatial\(B, \w+ // \w+ \* T\.int64\(-1\) \+ \(B - T\.int64\(1\)\)\)", script), script[:2500]
    for name, expected in ROW_PREFETCHES[pass_].items():
        prefetch = blocks[name].script()
        assert _prefetches(prefetch) == expected, prefetch
        ahead = compute.LINE_PREFETCH_AHEAD
        row = (f"T.max(H - T.int64(1) - vr - T.int64({ahead}), T.int64(0))" if pass_ == "backward"
               else f"H - T.int64(1) - T.min(vs + T.int64({ahead}), H - T.int64(1))")  # fmt: skip
        assert prefetch.count(row) >= sum(expected), prefetch
    assert "llvm.prefetch" in _compiled_ir(func), "the prefetches were dropped in code generation"


@pytest.mark.parametrize("pass_", ["forward", "fused", "backward"])
def test_rows_visited_top_to_bottom_and_columns_have_no_line_prefetches(pass_):
    """Ascending rows run their tasks in order, without prefetches (the hardware follows them; the
    prefetches made the ``b2t`` adjoint at 128x128 slower); column kernels stage tiles instead."""
    ascending = {"t2b": "b2t", "b2t": "t2b"}[DESCENDING[pass_][1]]
    for direction in (ascending, "l2r", "r2l"):
        script = ROW_KERNELS[pass_](direction, "float32").script()
        for name in ROW_PREFETCHES[pass_]:
            assert f'T.sblock("{name}")' not in script, (direction, name)
        assert "T.int64(-1) + (B - T.int64(1))" not in script, direction


def test_cuda_row_kernels_carry_no_cpu_prefetches():
    """The prefetches are an LLVM CPU intrinsic: the CUDA schedules build the same compute without them."""
    from gspn_tvm.schedules import cuda

    for func in (cuda.schedule_forward("b2t", "float32"), cuda.schedule_backward("t2b", "float32")):
        assert "llvm.prefetch" not in func.script()
