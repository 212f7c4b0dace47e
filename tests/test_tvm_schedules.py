"""Structure of the CPU column-scan kernels, and the workspace they keep after a call (issue 8).

Column scans (``l2r``, ``r2l``) stage ``TILE_LINES`` columns at a time through transposed tiles
declared inside the tile block (:func:`gspn_tvm.compute.scan_forward_column_tiles`): every staged
buffer holds ``TILE_LINES * (H + TILE_PAD)`` elements (the weight gradients three of them), none
grows with ``W``, ``B`` or ``C``, and global memory is read and written row by row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tvm import s_tir

from gspn_tvm import compute
from gspn_tvm.schedules import cpu

SCHEDULES = {"forward": cpu.schedule_forward, "backward": cpu.schedule_backward}
#: Buffers staged per tile: forward x, lam, gl, gm, gr, h; backward gl, gm, gr, the weight gradients,
#: gh, x, lam, the predecessor's h, dx, dlam.
STAGED = {"forward": 6, "backward": 10}
#: Forward copies of the rows and columns of a tile beyond a multiple of ``compute.V`` (element by element).
COPY_TAILS = ("stage_in_rows_tail", "stage_in_cols_tail", "stage_out_rows_tail", "stage_out_cols_tail")


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
        assert [int(d) for d in shape[:-1]] in ([cpu.TILE_LINES], [3, cpu.TILE_LINES]), f"{buffer.name}: {shape}"
        assert str(shape[-1]).replace(" ", "") == f"H+T.int64({compute.TILE_PAD})", f"{buffer.name}: rows of {shape[-1]}"
    task = blocks["plane" if pass_ == "forward" else "slice"]
    for buffer in task.alloc_buffers:  # the carried state: one line (per channel of the group) only
        assert "W" not in str(list(buffer.shape)), f"{buffer.name} grows with W: {list(buffer.shape)}"
    # global memory row by row: the innermost loop of every copy runs over the tile's columns
    copies = ("stage_in", "stage_out") if pass_ == "backward" else ()
    copies += ("stage_weights", "store_weight_grad") if pass_ == "backward" else COPY_TAILS
    for name in copies:
        block = blocks[name]
        assert [iv.var.name for iv in block.iter_vars][-1] in ("vk", "vm"), name


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
@pytest.mark.parametrize("name", ["stage_in_8x8", "stage_out_8x8"])
def test_forward_tiles_are_copied_in_register_blocks_of_constant_shape(direction, name):
    """The forward copies move 8x8 blocks (constant extents, so LLVM sees whole vectors) through a
    block-local register tile: vector loops of 8 on both sides, one block per 8 rows x 8 columns; the
    rows and columns beyond a multiple of 8 go through the scalar tail blocks."""
    func = cpu.schedule_forward(direction, "float32")
    block = _Blocks(func)[name]
    assert [iv.var.name for iv in block.iter_vars] == ["vib", "vkb"], name
    (register,) = block.alloc_buffers
    assert register.scope() == "local", register.scope()
    assert [int(d) for d in register.shape][-2:] == [compute.V, compute.V], list(register.shape)
    script = block.script()
    assert script.count(f"T.vectorized({compute.V})") == 2 and "T.vectorized(" not in script.replace(f"T.vectorized({compute.V})", ""), script


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_column_scans_are_parallel_over_tasks(direction):
    for pass_, schedule in SCHEDULES.items():
        script = schedule(direction, "float32").script()
        assert "T.parallel(" in script, f"{pass_}: tasks not parallel"


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
    thread (12 x 32 x 1040 float32 = 1.5 MiB), not plane-sized staging (before: 6x the data, 50+ MiB
    here). glibc's free memory is returned first (malloc_trim), so what is left is held by TVM."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(WORKSPACE)], capture_output=True, text=True,
                            cwd=root, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(out)
    per_thread = 12 * cpu.TILE_LINES * (1024 + compute.TILE_PAD) * 4
    bound = out["threads"] * per_thread + 2 * 2**20
    for direction, (forward, backward) in out["rows"].items():
        assert forward <= bound and backward <= bound, f"{direction}: kept {forward} / {backward} bytes, bound {bound}"
