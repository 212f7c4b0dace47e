"""TensorIR compute definitions of the GSPN scan (SPEC section 2) and its adjoint (section 4).

These functions say *what* is computed, not how: no thread bindings, no vectorization, no memory
scopes (those belong to ``gspn_tvm.schedules``). Every shape is symbolic (``B, C, G, H, W`` are
run-time variables), so one compiled function serves every shape.

Directions are index mappings, never copies: the direction chooses at definition time whether a line
is a row (``t2b``/``b2t``) or a column (``l2r``/``r2l``) and in which order lines are visited (the
order stays affine in the scan step, so schedules can stage tiles of lines); ``chunk`` (a run-time
int64 >= 0) restarts propagation every ``chunk`` lines. Indices are int64 throughout (shapes are
``T.int64`` variables), so tensors of more than 2**31 elements are addressed correctly.

The propagated state is kept in float32 line buffers with a zero halo at both ends, so that the
neighbours ``p - 1`` and ``p + 1`` of a line are read without out-of-bounds loads. A term that must
vanish (SPEC section 2: at a segment start, or where the neighbour is outside the line) is *selected*
to zero, never multiplied by a zero: its weight may hold ``inf`` or NaN, and ``inf * 0`` is NaN. The
selects are branch-free (``T.Select``), so the position loop still vectorizes. Each block reads and
writes disjoint buffers (a ``step`` block computes the new line into ``current``, a ``carry`` block
copies it into the haloed ``state``), so schedules may parallelize and bind the position loop of
every block.

Both kernels assert ``G >= 1``, ``G`` dividing ``C`` and ``chunk >= 0`` before touching memory, so
a direct call of the compiled function with bad sizes raises instead of dividing by zero or reading
past the weights (the torch-facing kernels validate earlier, with the reference's messages).
"""

from __future__ import annotations

from gspn_ref.directions import DIRECTIONS, is_column, is_reversed
from tvm.script import tirx as T

ACCUMULATION_DTYPE = "float32"


def forward_name(direction: str) -> str:
    """Symbol of the compiled forward scan for ``direction``."""
    return f"gspn_scan_forward_{direction}"


def backward_name(direction: str) -> str:
    """Symbol of the compiled adjoint scan for ``direction``."""
    return f"gspn_scan_backward_{direction}"


def _line_geometry(direction: str, H, W):
    """``(n_lines, line_length)``: ``(H, W)`` when a line is a row, ``(W, H)`` when it is a column."""
    return (W, H) if is_column(direction) else (H, W)


def _element(direction: str, line, pos):
    """``(i, j)`` of position ``pos`` on line ``line`` in the original ``(H, W)`` frame."""
    return (pos, line) if is_column(direction) else (line, pos)


def _line_of_step(direction: str, s, n_lines):
    """Original index of the ``s``-th line in scan order."""
    return n_lines - 1 - s if is_reversed(direction) else s


def _starts_segment(s, chunk):
    """True when scan step ``s`` starts a propagation segment (``R(s) = 0``); ``chunk`` is int64."""
    return T.Or(s == 0, T.And(chunk > 0, T.floormod(s, T.max(chunk, T.int64(1))) == 0))


def _term(in_range, weight, neighbour):
    """``weight * neighbour`` where ``in_range``, else exactly 0 (whatever ``weight`` holds)."""
    return T.Select(in_range, weight * neighbour, T.float32(0))


def scan_forward(direction: str, dtype: str):
    """Forward scan ``h = scan(x, lam, gl, gm, gr)`` along ``direction``, storage ``dtype``.

    Arguments: ``x, lam, h``: ``(B, C, H, W)``; ``gl, gm, gr``: ``(B, G, H, W)``; ``chunk``: int64 >= 0.
    Blocks: ``plane`` per ``(b, c)``; inside it ``line`` per scan step ``s`` (sequential) holding
    ``step`` (new line into ``current``), ``carry`` (into ``state``) and ``emit`` (into ``h``) per
    position ``p``. Every block writes one on-chip buffer at most, which keeps GPU barrier placement
    simple.
    """
    assert direction in DIRECTIONS, direction

    @T.prim_func(s_tir=True)
    def forward(
        x_handle: T.handle,
        lam_handle: T.handle,
        gl_handle: T.handle,
        gm_handle: T.handle,
        gr_handle: T.handle,
        h_handle: T.handle,
        chunk: T.int64,
    ):
        T.func_attr({"tir.noalias": True})
        B, C, G, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_handle, (B, C, H, W), dtype)
        lam = T.match_buffer(lam_handle, (B, C, H, W), dtype)
        gl = T.match_buffer(gl_handle, (B, G, H, W), dtype)
        gm = T.match_buffer(gm_handle, (B, G, H, W), dtype)
        gr = T.match_buffer(gr_handle, (B, G, H, W), dtype)
        h = T.match_buffer(h_handle, (B, C, H, W), dtype)
        n_lines, length = T.meta_var(_line_geometry(direction, H, W))
        chk = T.meta_var(T.Cast("int64", chunk))  # int64 even where a caller binds chunk to a constant
        assert G >= 1 and G <= C and C % G == 0, "gl: expected a group count G that divides C"
        assert chk >= 0, "chunk: expected an int >= 0"
        for b, c in T.grid(B, C):
            with T.sblock("plane"):
                vb, vc = T.axis.remap("SS", [b, c])
                T.reads(x[vb, vc, 0:H, 0:W], lam[vb, vc, 0:H, 0:W], gl[vb, 0:G, 0:H, 0:W], gm[vb, 0:G, 0:H, 0:W], gr[vb, 0:G, 0:H, 0:W])
                T.writes(h[vb, vc, 0:H, 0:W])
                vg = T.meta_var(vc // (C // G))
                # state[1 + p]: the previous line in float32; the halo state[0], state[P + 1] stays zero.
                state = T.sblock_alloc_buffer((length + 2,), ACCUMULATION_DTYPE)
                current = T.sblock_alloc_buffer((length,), ACCUMULATION_DTYPE)
                for q in range(length + 2):
                    with T.sblock("clear"):
                        vq = T.axis.spatial(length + 2, q)
                        state[vq] = T.float32(0)
                for s in range(n_lines):
                    with T.sblock("line"):
                        vs = T.axis.opaque(n_lines, s)
                        line = T.meta_var(_line_of_step(direction, vs, n_lines))
                        restart = T.meta_var(_starts_segment(vs, chk))
                        # Every position as if both neighbours existed (the halo is zero), a branch-free
                        # pass that vectorizes; then the two end positions again, with the terms that
                        # point outside the line selected to zero (their weights may be inf or NaN).
                        for p in range(length):
                            with T.sblock("step"):
                                vp = T.axis.spatial(length, p)
                                i, j = T.meta_var(_element(direction, line, vp))
                                propagated = T.meta_var(
                                    T.Cast(ACCUMULATION_DTYPE, gl[vb, vg, i, j]) * state[vp]
                                    + T.Cast(ACCUMULATION_DTYPE, gm[vb, vg, i, j]) * state[vp + 1]
                                    + T.Cast(ACCUMULATION_DTYPE, gr[vb, vg, i, j]) * state[vp + 2]
                                )
                                current[vp] = T.Cast(ACCUMULATION_DTYPE, lam[vb, vc, i, j]) * T.Cast(
                                    ACCUMULATION_DTYPE, x[vb, vc, i, j]
                                ) + T.Select(restart, T.float32(0), propagated)
                        for e in range(2):
                            with T.sblock("ends"):
                                ve = T.axis.spatial(2, e)
                                vp = T.meta_var(ve * (length - 1))  # p = 0 and p = P - 1
                                i, j = T.meta_var(_element(direction, line, vp))
                                propagated = T.meta_var(
                                    _term(vp > 0, T.Cast(ACCUMULATION_DTYPE, gl[vb, vg, i, j]), state[vp])
                                    + T.Cast(ACCUMULATION_DTYPE, gm[vb, vg, i, j]) * state[vp + 1]
                                    + _term(vp + 1 < length, T.Cast(ACCUMULATION_DTYPE, gr[vb, vg, i, j]), state[vp + 2])
                                )
                                current[vp] = T.Cast(ACCUMULATION_DTYPE, lam[vb, vc, i, j]) * T.Cast(
                                    ACCUMULATION_DTYPE, x[vb, vc, i, j]
                                ) + T.Select(restart, T.float32(0), propagated)
                        for p in range(length):
                            with T.sblock("carry"):
                                vp = T.axis.spatial(length, p)
                                state[vp + 1] = current[vp]
                        for p in range(length):
                            with T.sblock("emit"):
                                vp = T.axis.spatial(length, p)
                                i, j = T.meta_var(_element(direction, line, vp))
                                h[vb, vc, i, j] = T.Cast(dtype, state[vp + 1])

    return forward.with_attr("global_symbol", forward_name(direction))


def scan_backward(direction: str, dtype: str):
    """Adjoint scan along ``direction``: ``(dx, dlam, dgl, dgm, dgr)`` from ``gh`` and the forward ``h``.

    Arguments: ``gh, x, lam, h, dx, dlam``: ``(B, C, H, W)``; ``gl, gm, gr, dgl, dgm, dgr``:
    ``(B, G, H, W)``; ``chunk`` as in :func:`scan_forward`. One ``slice`` block per weight group
    ``(b, g)`` owns the group's ``C // G`` channels, so the weight gradients are summed over the
    group in float32 without atomics. Lines are visited in reverse scan order.

    ``flow[k, t, 1 + p]`` holds ``w_t[p] * d[p]`` of the last visited line for channel ``k`` of the
    slice and ``t`` in ``(gl, gm, gr)``: the adjoint of line ``s`` reads ``flow_l[p + 1]``,
    ``flow_m[p]`` and ``flow_r[p - 1]`` of line ``s + 1`` (zero halos at both ends; the extra
    channel ``k = C // G`` is all zeros and is read when line ``s`` has no successor). The products of
    the weights that point outside the line (``gl`` at ``p = 0``, ``gr`` at ``p = P - 1``) land in
    ``flow`` slots that no position reads. The weight gradients are selected to zero where the
    neighbour is outside the line or the line starts a segment (SPEC section 4).
    """
    assert direction in DIRECTIONS, direction

    @T.prim_func(s_tir=True)
    def backward(
        gh_handle: T.handle,
        x_handle: T.handle,
        lam_handle: T.handle,
        gl_handle: T.handle,
        gm_handle: T.handle,
        gr_handle: T.handle,
        h_handle: T.handle,
        dx_handle: T.handle,
        dlam_handle: T.handle,
        dgl_handle: T.handle,
        dgm_handle: T.handle,
        dgr_handle: T.handle,
        chunk: T.int64,
    ):
        T.func_attr({"tir.noalias": True})
        B, C, G, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        gh = T.match_buffer(gh_handle, (B, C, H, W), dtype)
        x = T.match_buffer(x_handle, (B, C, H, W), dtype)
        lam = T.match_buffer(lam_handle, (B, C, H, W), dtype)
        gl = T.match_buffer(gl_handle, (B, G, H, W), dtype)
        gm = T.match_buffer(gm_handle, (B, G, H, W), dtype)
        gr = T.match_buffer(gr_handle, (B, G, H, W), dtype)
        h = T.match_buffer(h_handle, (B, C, H, W), dtype)
        dx = T.match_buffer(dx_handle, (B, C, H, W), dtype)
        dlam = T.match_buffer(dlam_handle, (B, C, H, W), dtype)
        dgl = T.match_buffer(dgl_handle, (B, G, H, W), dtype)
        dgm = T.match_buffer(dgm_handle, (B, G, H, W), dtype)
        dgr = T.match_buffer(dgr_handle, (B, G, H, W), dtype)
        n_lines, length = T.meta_var(_line_geometry(direction, H, W))
        chk = T.meta_var(T.Cast("int64", chunk))
        assert G >= 1 and G <= C and C % G == 0, "gl: expected a group count G that divides C"
        assert chk >= 0, "chunk: expected an int >= 0"
        group_size = T.meta_var(C // G)
        for b, g in T.grid(B, G):
            with T.sblock("slice"):
                vb, vg = T.axis.remap("SS", [b, g])
                channels = T.meta_var(slice(vg * group_size, vg * group_size + group_size))
                T.reads(
                    gh[vb, channels, 0:H, 0:W],
                    x[vb, channels, 0:H, 0:W],
                    lam[vb, channels, 0:H, 0:W],
                    h[vb, channels, 0:H, 0:W],
                    gl[vb, vg, 0:H, 0:W],
                    gm[vb, vg, 0:H, 0:W],
                    gr[vb, vg, 0:H, 0:W],
                )
                T.writes(
                    dx[vb, channels, 0:H, 0:W],
                    dlam[vb, channels, 0:H, 0:W],
                    dgl[vb, vg, 0:H, 0:W],
                    dgm[vb, vg, 0:H, 0:W],
                    dgr[vb, vg, 0:H, 0:W],
                )
                flow = T.sblock_alloc_buffer((group_size + 1, 3, length + 2), ACCUMULATION_DTYPE)
                adjoint = T.sblock_alloc_buffer((length,), ACCUMULATION_DTYPE)
                # previous_h[1 + p]: line s - 1 of the forward output, with a zero halo.
                previous_h = T.sblock_alloc_buffer((length + 2,), ACCUMULATION_DTYPE)
                # per-channel contributions to the three weight gradients of the current line
                contribution = T.sblock_alloc_buffer((group_size, 3, length), ACCUMULATION_DTYPE)
                weight_grad = T.sblock_alloc_buffer((3, length), ACCUMULATION_DTYPE)
                for k, t, q in T.grid(group_size + 1, 3, length + 2):
                    with T.sblock("clear_flow"):
                        vk, vt, vq = T.axis.remap("SSS", [k, t, q])
                        flow[vk, vt, vq] = T.float32(0)
                for q in range(length + 2):
                    with T.sblock("clear_previous_h"):
                        vq = T.axis.spatial(length + 2, q)
                        previous_h[vq] = T.float32(0)
                for r in range(n_lines):
                    with T.sblock("line"):
                        vr = T.axis.opaque(n_lines, r)
                        vs = T.meta_var(n_lines - 1 - vr)  # lines are visited in reverse scan order
                        line = T.meta_var(_line_of_step(direction, vs, n_lines))
                        # The predecessor s - 1, clamped at 0: a segment start never uses it.
                        pred = T.meta_var(_line_of_step(direction, T.max(vs - 1, 0), n_lines))
                        no_successor = T.meta_var(T.Or(vs + 1 >= n_lines, _starts_segment(vs + 1, chk)))
                        restart = T.meta_var(_starts_segment(vs, chk))
                        for k in range(group_size):
                            with T.sblock("channel"):
                                vk = T.axis.opaque(group_size, k)
                                vc = T.meta_var(vg * group_size + vk)
                                successor = T.meta_var(T.Select(no_successor, group_size, vk))
                                for p in range(length):
                                    with T.sblock("load_previous_h"):
                                        vp = T.axis.spatial(length, p)
                                        pi, pj = T.meta_var(_element(direction, pred, vp))
                                        previous_h[vp + 1] = T.Cast(ACCUMULATION_DTYPE, h[vb, vc, pi, pj])
                                for p in range(length):
                                    with T.sblock("adjoint_step"):
                                        vp = T.axis.spatial(length, p)
                                        i, j = T.meta_var(_element(direction, line, vp))
                                        from_successor = T.meta_var(
                                            flow[successor, 0, vp + 2] + flow[successor, 1, vp + 1] + flow[successor, 2, vp]
                                        )
                                        adjoint[vp] = T.Cast(ACCUMULATION_DTYPE, gh[vb, vc, i, j]) + from_successor
                                for p in range(length):
                                    with T.sblock("input_gradients"):
                                        vp = T.axis.spatial(length, p)
                                        i, j = T.meta_var(_element(direction, line, vp))
                                        dx[vb, vc, i, j] = T.Cast(dtype, T.Cast(ACCUMULATION_DTYPE, lam[vb, vc, i, j]) * adjoint[vp])
                                        dlam[vb, vc, i, j] = T.Cast(dtype, T.Cast(ACCUMULATION_DTYPE, x[vb, vc, i, j]) * adjoint[vp])
                                # t = 0, 1, 2: the weight gl, gm, gr and its neighbour p - 1, p, p + 1
                                for t, p in T.grid(3, length):
                                    with T.sblock("flow"):
                                        vt, vp = T.axis.remap("SS", [t, p])
                                        i, j = T.meta_var(_element(direction, line, vp))
                                        weight = T.meta_var(
                                            T.Select(vt == 0, gl[vb, vg, i, j], T.Select(vt == 1, gm[vb, vg, i, j], gr[vb, vg, i, j]))
                                        )
                                        flow[vk, vt, vp + 1] = T.Cast(ACCUMULATION_DTYPE, weight) * adjoint[vp]
                                for t, p in T.grid(3, length):
                                    with T.sblock("contribution"):
                                        vt, vp = T.axis.remap("SS", [t, p])
                                        contribution[vk, vt, vp] = T.Select(
                                            restart, T.float32(0), adjoint[vp] * previous_h[vp + vt]
                                        )
                                # gl at p = 0 and gr at p = P - 1 point outside the line: exactly 0,
                                # not adjoint * halo (NaN where the adjoint is infinite)
                                for e in range(2):
                                    with T.sblock("contribution_ends"):
                                        ve = T.axis.spatial(2, e)
                                        contribution[vk, 2 * ve, ve * (length - 1)] = T.float32(0)
                        for t, p, k in T.grid(3, length, group_size):
                            with T.sblock("sum_weight_grad"):
                                vt, vp, vk = T.axis.remap("SSR", [t, p, k])
                                with T.init():
                                    weight_grad[vt, vp] = T.float32(0)
                                weight_grad[vt, vp] = weight_grad[vt, vp] + contribution[vk, vt, vp]
                        for p in range(length):
                            with T.sblock("store_weight_grad"):
                                vp = T.axis.spatial(length, p)
                                i, j = T.meta_var(_element(direction, line, vp))
                                dgl[vb, vg, i, j] = T.Cast(dtype, weight_grad[0, vp])
                                dgm[vb, vg, i, j] = T.Cast(dtype, weight_grad[1, vp])
                                dgr[vb, vg, i, j] = T.Cast(dtype, weight_grad[2, vp])

    return backward.with_attr("global_symbol", backward_name(direction))


# --- CPU column scans: the tiles written into the TensorIR ------------------------------------------
#
# A compute variant for one target, against the house rule "compute apart from schedule", because
# TVM 0.27's scheduling primitives cannot express it: staging a tile of columns with cache_read /
# compute_at at a tile loop over a symbolic extent allocates the staged buffers plane-sized (H x W
# per task, kept by the runtime's workspace pool after the call: 6x the data per thread), and the
# ways around it fail on symbolic shapes (read_at and loop_partition), reversed scans (a ``j % TILE``
# layout) or nested blocks (buffers never shrunk under a predicate). Here every staged buffer is
# declared inside the tile block with ``TILE * (H + PAD)`` elements, so one task holds at most that
# much per staged tensor, whatever W, B and C are. All of a task's tiles are declared in the same
# block: the runtime's per-thread workspace pool returns a buffer declared one loop deeper (a channel
# block inside the tile block) only at the end of the task, so such buffers piled up to plane size
# again (measured: +387 MiB after one adjoint at (1, 2, 2048, 2048), 6 MiB with one level). The
# pool keeps the tiles after the call (bounded: one task's tiles per thread). The arithmetic is the same as in
# :func:`scan_forward` / :func:`scan_backward` (same expressions, same selects to zero).

#: Elements added to every staged row: staged rows of a power-of-two length would all map to the
#: same cache sets.
TILE_PAD = 16

#: Side of the register blocks that stage a tile (8 float32: one AVX2 vector); the rows and
#: columns of a tile beyond a multiple of it are copied one element at a time.
V = 8


def scan_forward_column_tiles(direction: str, dtype: str, tile: int):
    """Forward column scan (``l2r``/``r2l``) staged through ``tile``-column transposed tiles.

    Same arguments and result as :func:`scan_forward`. Blocks: ``plane`` per ``(b, c)``; inside it
    ``tile`` per ``tile`` columns in scan order, holding ``stage_in_8x8`` (the tile's inputs copied
    into ``(tile, H + TILE_PAD)`` float32 buffers, transposed so that a column is contiguous, one
    ``V x V`` block at a time through a block-local register tile: vector loads along the rows of the
    input, vector stores along the staged columns; the constant block shape is what lets LLVM emit
    whole vectors, where a copy over symbolic extents stays scalar), ``stage_in_rows_tail`` /
    ``stage_in_cols_tail`` (the rows and columns beyond a multiple of ``V``, element by element),
    ``line`` per column (``step``, ``ends``, ``carry`` as in :func:`scan_forward`, the new column
    written to the staged output) and ``stage_out_8x8`` / ``stage_out_*_tail`` (copied back the same
    way, converted to ``dtype``).
    """
    assert is_column(direction), direction
    reversed_ = is_reversed(direction)
    f32 = ACCUMULATION_DTYPE

    @T.prim_func(s_tir=True)
    def forward(
        x_handle: T.handle,
        lam_handle: T.handle,
        gl_handle: T.handle,
        gm_handle: T.handle,
        gr_handle: T.handle,
        h_handle: T.handle,
        chunk: T.int64,
    ):
        T.func_attr({"tir.noalias": True})
        B, C, G, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_handle, (B, C, H, W), dtype)
        lam = T.match_buffer(lam_handle, (B, C, H, W), dtype)
        gl = T.match_buffer(gl_handle, (B, G, H, W), dtype)
        gm = T.match_buffer(gm_handle, (B, G, H, W), dtype)
        gr = T.match_buffer(gr_handle, (B, G, H, W), dtype)
        h = T.match_buffer(h_handle, (B, C, H, W), dtype)
        chk = T.meta_var(T.Cast("int64", chunk))
        assert G >= 1 and G <= C and C % G == 0, "gl: expected a group count G that divides C"
        assert chk >= 0, "chunk: expected an int >= 0"
        n_tiles = T.meta_var((W + (tile - 1)) // tile)
        for b, c in T.grid(B, C):
            with T.sblock("plane"):
                vb, vc = T.axis.remap("SS", [b, c])
                T.reads(x[vb, vc, 0:H, 0:W], lam[vb, vc, 0:H, 0:W], gl[vb, 0:G, 0:H, 0:W], gm[vb, 0:G, 0:H, 0:W], gr[vb, 0:G, 0:H, 0:W])
                T.writes(h[vb, vc, 0:H, 0:W])
                vg = T.meta_var(vc // (C // G))
                state = T.sblock_alloc_buffer((H + 2,), f32)
                for q in range(H + 2):
                    with T.sblock("clear"):
                        vq = T.axis.spatial(H + 2, q)
                        state[vq] = T.float32(0)
                for t in range(n_tiles):
                    with T.sblock("tile"):
                        vt = T.axis.opaque(n_tiles, t)
                        first = T.meta_var(vt * tile)
                        count = T.meta_var(T.min(W - first, tile))
                        # column of step first + k: first + k (l2r) or W - 1 - first - k (r2l)
                        col = T.meta_var(lambda k: W - 1 - first - k if reversed_ else first + k)
                        # first column in memory of the steps k0 .. k0 + V - 1 and the register lane of step
                        # k0 + e: the block's loads and stores run up the memory in both directions (a
                        # descending vector access is scalar in TVM's LLVM code generator)
                        mem = T.meta_var(lambda k0: col(k0 + V - 1) if reversed_ else col(k0))
                        lane = T.meta_var(lambda e: V - 1 - e if reversed_ else e)
                        xs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        lams = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        gls = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        gms = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        grs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        hs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        full_rows = T.meta_var(H // V * V)
                        full_cols = T.meta_var(count // V * V)
                        for ib, kb in T.grid(H // V, count // V):
                            with T.sblock("stage_in_8x8"):
                                vib, vkb = T.axis.remap("SS", [ib, kb])
                                # 8x8 blocks of constant shape: vector loads along the rows, vector stores
                                # along the staged columns, through a block-local register tile
                                reg = T.sblock_alloc_buffer((5, V, V), f32, scope="local")
                                i0 = T.meta_var(vib * V)
                                k0 = T.meta_var(vkb * V)
                                for a in range(V):
                                    for e in T.vectorized(V):
                                        reg[0, a, e] = T.Cast(f32, x[vb, vc, i0 + a, mem(k0) + e])
                                        reg[1, a, e] = T.Cast(f32, lam[vb, vc, i0 + a, mem(k0) + e])
                                        reg[2, a, e] = T.Cast(f32, gl[vb, vg, i0 + a, mem(k0) + e])
                                        reg[3, a, e] = T.Cast(f32, gm[vb, vg, i0 + a, mem(k0) + e])
                                        reg[4, a, e] = T.Cast(f32, gr[vb, vg, i0 + a, mem(k0) + e])
                                for e in range(V):
                                    for a in T.vectorized(V):
                                        xs[k0 + e, i0 + a] = reg[0, a, lane(e)]
                                        lams[k0 + e, i0 + a] = reg[1, a, lane(e)]
                                        gls[k0 + e, i0 + a] = reg[2, a, lane(e)]
                                        gms[k0 + e, i0 + a] = reg[3, a, lane(e)]
                                        grs[k0 + e, i0 + a] = reg[4, a, lane(e)]
                        for i, k in T.grid(H - full_rows, count):
                            with T.sblock("stage_in_rows_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                xs[vk, full_rows + vi] = T.Cast(f32, x[vb, vc, full_rows + vi, col(vk)])
                                lams[vk, full_rows + vi] = T.Cast(f32, lam[vb, vc, full_rows + vi, col(vk)])
                                gls[vk, full_rows + vi] = T.Cast(f32, gl[vb, vg, full_rows + vi, col(vk)])
                                gms[vk, full_rows + vi] = T.Cast(f32, gm[vb, vg, full_rows + vi, col(vk)])
                                grs[vk, full_rows + vi] = T.Cast(f32, gr[vb, vg, full_rows + vi, col(vk)])
                        for i, k in T.grid(full_rows, count - full_cols):
                            with T.sblock("stage_in_cols_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                xs[full_cols + vk, vi] = T.Cast(f32, x[vb, vc, vi, col(full_cols + vk)])
                                lams[full_cols + vk, vi] = T.Cast(f32, lam[vb, vc, vi, col(full_cols + vk)])
                                gls[full_cols + vk, vi] = T.Cast(f32, gl[vb, vg, vi, col(full_cols + vk)])
                                gms[full_cols + vk, vi] = T.Cast(f32, gm[vb, vg, vi, col(full_cols + vk)])
                                grs[full_cols + vk, vi] = T.Cast(f32, gr[vb, vg, vi, col(full_cols + vk)])
                        for k in range(count):
                            with T.sblock("line"):
                                vk = T.axis.opaque(tile, k)
                                restart = T.meta_var(_starts_segment(first + vk, chk))
                                for p in range(H):
                                    with T.sblock("step"):
                                        vp = T.axis.spatial(H, p)
                                        propagated = T.meta_var(
                                            gls[vk, vp] * state[vp] + gms[vk, vp] * state[vp + 1] + grs[vk, vp] * state[vp + 2]
                                        )
                                        hs[vk, vp] = lams[vk, vp] * xs[vk, vp] + T.Select(restart, T.float32(0), propagated)
                                for e in range(2):
                                    with T.sblock("ends"):
                                        ve = T.axis.spatial(2, e)
                                        vp = T.meta_var(ve * (H - 1))
                                        propagated = T.meta_var(
                                            _term(vp > 0, gls[vk, vp], state[vp])
                                            + gms[vk, vp] * state[vp + 1]
                                            + _term(vp + 1 < H, grs[vk, vp], state[vp + 2])
                                        )
                                        hs[vk, vp] = lams[vk, vp] * xs[vk, vp] + T.Select(restart, T.float32(0), propagated)
                                for p in range(H):
                                    with T.sblock("carry"):
                                        vp = T.axis.spatial(H, p)
                                        state[vp + 1] = hs[vk, vp]
                        for ib, kb in T.grid(H // V, count // V):
                            with T.sblock("stage_out_8x8"):
                                vib, vkb = T.axis.remap("SS", [ib, kb])
                                reg = T.sblock_alloc_buffer((V, V), f32, scope="local")
                                i0 = T.meta_var(vib * V)
                                k0 = T.meta_var(vkb * V)
                                for e in range(V):
                                    for a in T.vectorized(V):
                                        reg[a, lane(e)] = hs[k0 + e, i0 + a]
                                for a in range(V):
                                    for e in T.vectorized(V):
                                        h[vb, vc, i0 + a, mem(k0) + e] = T.Cast(dtype, reg[a, e])
                        for i, k in T.grid(H - full_rows, count):
                            with T.sblock("stage_out_rows_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                h[vb, vc, full_rows + vi, col(vk)] = T.Cast(dtype, hs[vk, full_rows + vi])
                        for i, k in T.grid(full_rows, count - full_cols):
                            with T.sblock("stage_out_cols_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                h[vb, vc, vi, col(full_cols + vk)] = T.Cast(dtype, hs[full_cols + vk, vi])

    return forward.with_attr("global_symbol", forward_name(direction))


def scan_backward_column_tiles(direction: str, dtype: str, tile: int):
    """Adjoint column scan (``l2r``/``r2l``) staged through ``tile``-column transposed tiles.

    Same arguments and results as :func:`scan_backward`, same ``flow`` state. Tiles follow the
    visiting order (reverse scan order). Per tile: the group's weights are staged once; per channel
    of the group, ``gh, x, lam`` and the forward output of each column's *predecessor* are staged,
    the columns are visited (``adjoint_step``, ``input_gradients`` into staged ``dx, dlam``,
    ``flow``, and the three weight-gradient contributions accumulated in float32 tiles over the
    group's channels) and ``dx, dlam`` are copied back; then the weight gradients. The contributions
    of ``gl`` at ``p = 0`` and ``gr`` at ``p = P - 1`` are never accumulated (their loops start or
    stop one position early), so they stay exactly 0 without a select in the position loop.
    """
    assert is_column(direction), direction
    reversed_ = is_reversed(direction)
    f32 = ACCUMULATION_DTYPE

    @T.prim_func(s_tir=True)
    def backward(
        gh_handle: T.handle,
        x_handle: T.handle,
        lam_handle: T.handle,
        gl_handle: T.handle,
        gm_handle: T.handle,
        gr_handle: T.handle,
        h_handle: T.handle,
        dx_handle: T.handle,
        dlam_handle: T.handle,
        dgl_handle: T.handle,
        dgm_handle: T.handle,
        dgr_handle: T.handle,
        chunk: T.int64,
    ):
        T.func_attr({"tir.noalias": True})
        B, C, G, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        gh = T.match_buffer(gh_handle, (B, C, H, W), dtype)
        x = T.match_buffer(x_handle, (B, C, H, W), dtype)
        lam = T.match_buffer(lam_handle, (B, C, H, W), dtype)
        gl = T.match_buffer(gl_handle, (B, G, H, W), dtype)
        gm = T.match_buffer(gm_handle, (B, G, H, W), dtype)
        gr = T.match_buffer(gr_handle, (B, G, H, W), dtype)
        h = T.match_buffer(h_handle, (B, C, H, W), dtype)
        dx = T.match_buffer(dx_handle, (B, C, H, W), dtype)
        dlam = T.match_buffer(dlam_handle, (B, C, H, W), dtype)
        dgl = T.match_buffer(dgl_handle, (B, G, H, W), dtype)
        dgm = T.match_buffer(dgm_handle, (B, G, H, W), dtype)
        dgr = T.match_buffer(dgr_handle, (B, G, H, W), dtype)
        chk = T.meta_var(T.Cast("int64", chunk))
        assert G >= 1 and G <= C and C % G == 0, "gl: expected a group count G that divides C"
        assert chk >= 0, "chunk: expected an int >= 0"
        group_size = T.meta_var(C // G)
        n_tiles = T.meta_var((W + (tile - 1)) // tile)
        for b, g in T.grid(B, G):
            with T.sblock("slice"):
                vb, vg = T.axis.remap("SS", [b, g])
                channels = T.meta_var(slice(vg * group_size, vg * group_size + group_size))
                T.reads(gh[vb, channels, 0:H, 0:W], x[vb, channels, 0:H, 0:W], lam[vb, channels, 0:H, 0:W],
                        h[vb, channels, 0:H, 0:W], gl[vb, vg, 0:H, 0:W], gm[vb, vg, 0:H, 0:W], gr[vb, vg, 0:H, 0:W])  # fmt: skip
                T.writes(dx[vb, channels, 0:H, 0:W], dlam[vb, channels, 0:H, 0:W], dgl[vb, vg, 0:H, 0:W],
                         dgm[vb, vg, 0:H, 0:W], dgr[vb, vg, 0:H, 0:W])  # fmt: skip
                flow = T.sblock_alloc_buffer((group_size + 1, 3, H + 2), f32)
                adjoint = T.sblock_alloc_buffer((H,), f32)
                for k, t, q in T.grid(group_size + 1, 3, H + 2):
                    with T.sblock("clear_flow"):
                        vk, vt, vq = T.axis.remap("SSS", [k, t, q])
                        flow[vk, vt, vq] = T.float32(0)
                for r in range(n_tiles):
                    with T.sblock("tile"):
                        vr = T.axis.opaque(n_tiles, r)
                        first = T.meta_var(vr * tile)  # visit index of the tile's first column
                        count = T.meta_var(T.min(W - first, tile))
                        # scan step of visit index first + m, and its column
                        step = T.meta_var(lambda m: W - 1 - first - m)
                        col = T.meta_var(lambda m: first + m if reversed_ else W - 1 - first - m)
                        # column of the predecessor (step - 1, clamped at 0: a segment start never uses it)
                        pred_col = T.meta_var(lambda m: (W - 1 - T.max(step(m) - 1, 0)) if reversed_ else T.max(step(m) - 1, 0))
                        gls = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        gms = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        grs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        wgrad = T.sblock_alloc_buffer((3, tile, H + TILE_PAD), f32)
                        ghs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        xs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        lams = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        hps = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        dxs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        dlams = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        for i, m in T.grid(H, count):
                            with T.sblock("stage_weights"):
                                vi, vm = T.axis.remap("SS", [i, m])
                                gls[vm, vi] = T.Cast(f32, gl[vb, vg, vi, col(vm)])
                                gms[vm, vi] = T.Cast(f32, gm[vb, vg, vi, col(vm)])
                                grs[vm, vi] = T.Cast(f32, gr[vb, vg, vi, col(vm)])
                        for t, m, p in T.grid(3, count, H):
                            with T.sblock("clear_weight_grad"):
                                vt, vm, vp = T.axis.remap("SSS", [t, m, p])
                                wgrad[vt, vm, vp] = T.float32(0)
                        for k in range(group_size):
                            with T.sblock("channel"):
                                vk = T.axis.opaque(group_size, k)
                                vc = T.meta_var(vg * group_size + vk)
                                for i, m in T.grid(H, count):
                                    with T.sblock("stage_in"):
                                        vi, vm = T.axis.remap("SS", [i, m])
                                        ghs[vm, vi] = T.Cast(f32, gh[vb, vc, vi, col(vm)])
                                        xs[vm, vi] = T.Cast(f32, x[vb, vc, vi, col(vm)])
                                        lams[vm, vi] = T.Cast(f32, lam[vb, vc, vi, col(vm)])
                                        hps[vm, vi] = T.Cast(f32, h[vb, vc, vi, pred_col(vm)])
                                for m in range(count):
                                    with T.sblock("line"):
                                        vm = T.axis.opaque(tile, m)
                                        vs = T.meta_var(step(vm))
                                        no_successor = T.meta_var(T.Or(vs + 1 >= W, _starts_segment(vs + 1, chk)))
                                        restart = T.meta_var(_starts_segment(vs, chk))
                                        successor = T.meta_var(T.Select(no_successor, group_size, vk))
                                        for p in range(H):
                                            with T.sblock("adjoint_step"):
                                                vp = T.axis.spatial(H, p)
                                                adjoint[vp] = ghs[vm, vp] + (
                                                    flow[successor, 0, vp + 2] + flow[successor, 1, vp + 1] + flow[successor, 2, vp]
                                                )
                                        for p in range(H):
                                            with T.sblock("input_gradients"):
                                                vp = T.axis.spatial(H, p)
                                                dxs[vm, vp] = lams[vm, vp] * adjoint[vp]
                                                dlams[vm, vp] = xs[vm, vp] * adjoint[vp]
                                        for p in range(H):
                                            with T.sblock("flow"):
                                                vp = T.axis.spatial(H, p)
                                                flow[vk, 0, vp + 1] = gls[vm, vp] * adjoint[vp]
                                                flow[vk, 1, vp + 1] = gms[vm, vp] * adjoint[vp]
                                                flow[vk, 2, vp + 1] = grs[vm, vp] * adjoint[vp]
                                        # neighbour p - 1 (gl, from p = 1), p (gm), p + 1 (gr, to p = P - 2)
                                        for p in range(H - 1):
                                            with T.sblock("contribution_left"):
                                                vp = T.axis.spatial(H - 1, p)
                                                wgrad[0, vm, vp + 1] = wgrad[0, vm, vp + 1] + T.Select(
                                                    restart, T.float32(0), adjoint[vp + 1] * hps[vm, vp])
                                        for p in range(H):
                                            with T.sblock("contribution_middle"):
                                                vp = T.axis.spatial(H, p)
                                                wgrad[1, vm, vp] = wgrad[1, vm, vp] + T.Select(
                                                    restart, T.float32(0), adjoint[vp] * hps[vm, vp])
                                        for p in range(H - 1):
                                            with T.sblock("contribution_right"):
                                                vp = T.axis.spatial(H - 1, p)
                                                wgrad[2, vm, vp] = wgrad[2, vm, vp] + T.Select(
                                                    restart, T.float32(0), adjoint[vp] * hps[vm, vp + 1])
                                for i, m in T.grid(H, count):
                                    with T.sblock("stage_out"):
                                        vi, vm = T.axis.remap("SS", [i, m])
                                        dx[vb, vc, vi, col(vm)] = T.Cast(dtype, dxs[vm, vi])
                                        dlam[vb, vc, vi, col(vm)] = T.Cast(dtype, dlams[vm, vi])
                        for i, m in T.grid(H, count):
                            with T.sblock("store_weight_grad"):
                                vi, vm = T.axis.remap("SS", [i, m])
                                dgl[vb, vg, vi, col(vm)] = T.Cast(dtype, wgrad[0, vm, vi])
                                dgm[vb, vg, vi, col(vm)] = T.Cast(dtype, wgrad[1, vm, vi])
                                dgr[vb, vg, vi, col(vm)] = T.Cast(dtype, wgrad[2, vm, vi])

    return backward.with_attr("global_symbol", backward_name(direction))
