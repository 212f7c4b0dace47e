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
import tvm
from tvm.ir.prim.expr import Ramp, Shuffle
from tvm.script import tirx as T

ACCUMULATION_DTYPE = "float32"


def forward_name(direction: str) -> str:
    """Symbol of the compiled forward scan for ``direction``."""
    return f"gspn_scan_forward_{direction}"


def fused_forward_name(direction: str) -> str:
    """Symbol of the compiled fused forward scan for ``direction``."""
    return f"gspn_fused_scan_forward_{direction}"


def lanes_name(symbol: str) -> str:
    """Symbol of the small-plane (channels as vector lanes) variant of the kernel ``symbol``."""
    return f"{symbol}_lanes"


def projected_name(symbol: str) -> str:
    """Symbol of the variant of the fused forward ``symbol`` that projects its inputs from a proxy."""
    return f"{symbol}_projected"


def packed_logits_name(symbol: str) -> str:
    """Symbol of the packed-logits variant of the fused forward ``symbol``."""
    return f"{symbol}_packed_logits"


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


# --- Forward scans: the plain scan and the fused scan share one body --------------------------------
#
# The fused scan (docs/operator.md, "The fused scan") reads the raw weight logits and normalizes them
# where the plain scan reads its weights (:func:`_weights`), and writes ``h * gate + u * skip`` where
# the plain scan writes ``h`` (:func:`_output`). Every forward body is a macro over the buffers and
# ``fused`` (a Python bool: the parser keeps one branch); :func:`_forward_func` wraps it in the
# PrimFunc signature of either operator.

#: TOPI's ``fast_exp`` (Cephes ``expf``: range reduction by ``ln 2``, a degree-7 polynomial, the
#: exponent written into the bits), in TensorIR: the exact ``exp`` of a vector lowers to one libm
#: call per lane, this one stays in vector registers. Within 2 ulp of ``expf`` over float32's range.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_BOUND = 88.3762626647949
NORMALIZATION_FLOOR = 1e-7  # gspn_ref.normalize.NORMALIZATION_FLOOR, as a float32 constant


def _fast_exp(x):
    """``exp(x)`` of a float32 expression, branch-free (``x`` clamped to +-88.38: never inf)."""
    f32 = ACCUMULATION_DTYPE
    x = T.max(T.min(x, T.float32(_EXP_BOUND)), T.float32(-_EXP_BOUND))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    f = x - n * T.float32(0.6931471805599453)
    poly = T.float32(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        poly = poly * f + T.float32(c)
    mantissa = poly * f * f + f + T.float32(1)
    scale = T.reinterpret(f32, T.shift_left(T.Cast("int32", n + T.float32(127)), T.int32(23)))
    return scale * mantissa


def _sigmoid(a):
    return T.float32(1) / (T.float32(1) + _fast_exp(-a))


def _weights(fused: bool, raw_l, raw_m, raw_r, pos, length):
    """``(gl, gm, gr)`` at position ``pos`` of a line of ``length`` from the three float32 values read
    there: the weights themselves (plain scan), or the logits (fused scan): ``s_k = sigmoid(a_k)``,
    ``s_l = 0`` at ``pos = 0`` and ``s_r = 0`` at ``pos = length - 1`` (selected, so the position loop
    stays branch-free), ``t = max(s_l + s_m + s_r, 1e-7)``, ``g_k = s_k / t`` (SPEC, weight
    normalization). Fused weights are finite, zero where they point outside the line.

    ``pos=None``: an interior position (both neighbours inside the line), no selects: the ``step``
    pass, whose two end positions the ``ends`` pass overwrites. A select on the position would make
    TVM's loop partitioning peel the first and last vector of the CPU schedule into scalar code."""
    if not fused:
        return raw_l, raw_m, raw_r
    s_l, s_m, s_r = _sigmoid(raw_l), _sigmoid(raw_m), _sigmoid(raw_r)
    if pos is not None:
        s_l = T.Select(pos > 0, s_l, T.float32(0))
        s_r = T.Select(pos + 1 < length, s_r, T.float32(0))
    inverse = T.float32(1) / T.max(s_l + s_m + s_r, T.float32(NORMALIZATION_FLOOR))
    return s_l * inverse, s_m * inverse, s_r * inverse


def _output(fused: bool, h, u, gate, skip):
    """What a forward scan writes at a position (float32): ``h``, or ``h * gate + u * skip`` (fused)."""
    return h * gate + u * skip if fused else h


#: Elements per prefetch: a 64-byte cache line of float32 (16-bit dtypes prefetch each line twice).
PREFETCH_STRIDE = 16


#: Lines ahead (in visit order) that a CPU row kernel visiting rows bottom to top prefetches: the
#: hardware prefetchers follow ascending streams, not the 7 to 12 descending ones of such a kernel
#: (the forward ``b2t``, the adjoint of ``t2b``). Measured at 2 on the 2-core EPYC: 1 and 4 the same
#: within noise, 8 worse.
LINE_PREFETCH_AHEAD = 2


def _descends(direction: str, adjoint: bool) -> bool:
    """True when a row kernel visits rows bottom to top (descending addresses): the forward ``b2t``
    and the adjoint of ``t2b`` (lines in reverse scan order)."""
    return not is_column(direction) and is_reversed(direction) != adjoint


def _prefetch_address(address, write: bool = False):
    """A prefetch of ``address`` into every cache level, for reading or (``write``) for writing."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(int(write)), T.int32(3), T.int32(1))


def _prefetch_row(buffer, b, c, row, q, length, write: bool = False):
    """Prefetch ``q`` of row ``row`` of plane ``buffer[b, c]``: element ``PREFETCH_STRIDE * q``,
    clamped to the row's last one (``q`` up to :func:`_row_prefetches` covers a row at any
    alignment)."""
    return _prefetch_address(T.address_of(buffer[b, c, row, T.min(q * PREFETCH_STRIDE, length - 1)]), write)


def _row_prefetches(length):
    """Prefetches that cover a row of ``length`` elements wherever it starts in a cache line."""
    return (length + (PREFETCH_STRIDE - 1)) // PREFETCH_STRIDE + 1


def _row_planes(direction: str, dtype: str, fused: bool, stream_hints: bool = False):
    """Macro of the forward body for every direction, lines read in place (row scans on CPU, every
    scan on CUDA): ``plane`` per ``(b, c)``; inside it ``line`` per scan step ``s`` (sequential)
    holding ``step`` (new line into ``current``), ``ends`` (positions 0 and ``P - 1`` again, terms
    that point outside the line selected to zero), ``carry`` (into ``state``) and ``emit`` (into the
    output) per position ``p``. Every block writes one on-chip buffer at most, which keeps GPU barrier
    placement simple."""
    f32 = ACCUMULATION_DTYPE
    descending = stream_hints and _descends(direction, adjoint=False)

    @T.macro
    def planes(x, lam, wl, wm, wr, gate, skip, out, B, C, G, H, W, chk):
        n_lines, length = T.meta_var(_line_geometry(direction, H, W))
        for b, c in T.grid(B, C):
            with T.sblock("plane"):
                if descending:
                    # planes in descending order too: a thread's run of planes is one descending stream
                    vb = T.axis.spatial(B, B - 1 - b)
                    vc = T.axis.spatial(C, C - 1 - c)
                else:
                    vb, vc = T.axis.remap("SS", [b, c])
                if fused:
                    T.reads(x[vb, vc, 0:H, 0:W], lam[vb, vc, 0:H, 0:W], wl[vb, 0:G, 0:H, 0:W], wm[vb, 0:G, 0:H, 0:W],
                            wr[vb, 0:G, 0:H, 0:W], gate[vb, vc, 0:H, 0:W], skip[vb, vc, 0:H, 0:W])  # fmt: skip
                else:
                    T.reads(x[vb, vc, 0:H, 0:W], lam[vb, vc, 0:H, 0:W], wl[vb, 0:G, 0:H, 0:W], wm[vb, 0:G, 0:H, 0:W],
                            wr[vb, 0:G, 0:H, 0:W])  # fmt: skip
                T.writes(out[vb, vc, 0:H, 0:W])
                vg = T.meta_var(vc // (C // G))
                # state[1 + p]: the previous line in float32; the halo state[0], state[P + 1] stays zero.
                state = T.sblock_alloc_buffer((length + 2,), f32)
                current = T.sblock_alloc_buffer((length,), f32)
                for q in range(length + 2):
                    with T.sblock("clear"):
                        vq = T.axis.spatial(length + 2, q)
                        state[vq] = T.float32(0)
                for s in range(n_lines):
                    with T.sblock("line"):
                        vs = T.axis.opaque(n_lines, s)
                        line = T.meta_var(_line_of_step(direction, vs, n_lines))
                        restart = T.meta_var(_starts_segment(vs, chk))
                        if descending:
                            ahead = T.meta_var(_line_of_step(direction, T.min(vs + LINE_PREFETCH_AHEAD, n_lines - 1), n_lines))
                            for q in range(_row_prefetches(length)):
                                with T.sblock("prefetch_ahead"):
                                    vq = T.axis.opaque(_row_prefetches(length), q)
                                    T.evaluate(_prefetch_row(x, vb, vc, ahead, vq, length))
                                    T.evaluate(_prefetch_row(lam, vb, vc, ahead, vq, length))
                                    T.evaluate(_prefetch_row(wl, vb, vg, ahead, vq, length))
                                    T.evaluate(_prefetch_row(wm, vb, vg, ahead, vq, length))
                                    T.evaluate(_prefetch_row(wr, vb, vg, ahead, vq, length))
                                    T.evaluate(_prefetch_row(out, vb, vc, ahead, vq, length, write=True))
                                    if fused:
                                        T.evaluate(_prefetch_row(gate, vb, vc, ahead, vq, length))
                                        T.evaluate(_prefetch_row(skip, vb, vc, ahead, vq, length))
                        # Every position as if both neighbours existed (the halo is zero), a branch-free
                        # pass that vectorizes; then the two end positions again, with the terms that
                        # point outside the line selected to zero (their weights may be inf or NaN).
                        for p in range(length):
                            with T.sblock("step"):
                                vp = T.axis.spatial(length, p)
                                i, j = T.meta_var(_element(direction, line, vp))
                                gl, gm, gr = T.meta_var(_weights(fused, T.Cast(f32, wl[vb, vg, i, j]), T.Cast(f32, wm[vb, vg, i, j]),
                                                                 T.Cast(f32, wr[vb, vg, i, j]), None, length))  # fmt: skip
                                propagated = T.meta_var(gl * state[vp] + gm * state[vp + 1] + gr * state[vp + 2])
                                current[vp] = T.Cast(f32, lam[vb, vc, i, j]) * T.Cast(f32, x[vb, vc, i, j]) + T.Select(
                                    restart, T.float32(0), propagated)
                        for e in range(2):
                            with T.sblock("ends"):
                                ve = T.axis.spatial(2, e)
                                vp = T.meta_var(ve * (length - 1))  # p = 0 and p = P - 1
                                i, j = T.meta_var(_element(direction, line, vp))
                                gl, gm, gr = T.meta_var(_weights(fused, T.Cast(f32, wl[vb, vg, i, j]), T.Cast(f32, wm[vb, vg, i, j]),
                                                                 T.Cast(f32, wr[vb, vg, i, j]), vp, length))  # fmt: skip
                                propagated = T.meta_var(
                                    _term(vp > 0, gl, state[vp]) + gm * state[vp + 1] + _term(vp + 1 < length, gr, state[vp + 2])
                                )
                                current[vp] = T.Cast(f32, lam[vb, vc, i, j]) * T.Cast(f32, x[vb, vc, i, j]) + T.Select(
                                    restart, T.float32(0), propagated)
                        for p in range(length):
                            with T.sblock("carry"):
                                vp = T.axis.spatial(length, p)
                                state[vp + 1] = current[vp]
                        for p in range(length):
                            with T.sblock("emit"):
                                vp = T.axis.spatial(length, p)
                                i, j = T.meta_var(_element(direction, line, vp))
                                if fused:
                                    out[vb, vc, i, j] = T.Cast(dtype, _output(fused, state[vp + 1], T.Cast(f32, x[vb, vc, i, j]),
                                                                            T.Cast(f32, gate[vb, vc, i, j]), T.Cast(f32, skip[vb, vc, i, j])))  # fmt: skip
                                else:
                                    out[vb, vc, i, j] = T.Cast(dtype, state[vp + 1])

    return planes


def _forward_func(dtype: str, fused: bool, planes, symbol: str):
    """The PrimFunc of a forward scan around the body macro ``planes`` (see :func:`scan_forward` and
    :func:`fused_scan_forward` for the arguments)."""
    if fused:

        @T.prim_func(s_tir=True)
        def forward(u_handle: T.handle, lam_handle: T.handle, al_handle: T.handle, am_handle: T.handle,
                    ar_handle: T.handle, gate_handle: T.handle, skip_handle: T.handle, y_handle: T.handle,
                    chunk: T.int64):  # fmt: skip
            T.func_attr({"tir.noalias": True})
            B, C, G, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            u = T.match_buffer(u_handle, (B, C, H, W), dtype)
            lam = T.match_buffer(lam_handle, (B, C, H, W), dtype)
            al = T.match_buffer(al_handle, (B, G, H, W), dtype)
            am = T.match_buffer(am_handle, (B, G, H, W), dtype)
            ar = T.match_buffer(ar_handle, (B, G, H, W), dtype)
            gate = T.match_buffer(gate_handle, (B, C, H, W), dtype)
            skip = T.match_buffer(skip_handle, (B, C, H, W), dtype)
            y = T.match_buffer(y_handle, (B, C, H, W), dtype)
            chk = T.meta_var(T.Cast("int64", chunk))  # int64 even where a caller binds chunk to a constant
            assert G >= 1 and G <= C and C % G == 0, "al: expected a group count G that divides C"
            assert chk >= 0, "chunk: expected an int >= 0"
            planes(u, lam, al, am, ar, gate, skip, y, B, C, G, H, W, chk)

    else:

        @T.prim_func(s_tir=True)
        def forward(x_handle: T.handle, lam_handle: T.handle, gl_handle: T.handle, gm_handle: T.handle,
                    gr_handle: T.handle, h_handle: T.handle, chunk: T.int64):  # fmt: skip
            T.func_attr({"tir.noalias": True})
            B, C, G, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            x = T.match_buffer(x_handle, (B, C, H, W), dtype)
            lam = T.match_buffer(lam_handle, (B, C, H, W), dtype)
            gl = T.match_buffer(gl_handle, (B, G, H, W), dtype)
            gm = T.match_buffer(gm_handle, (B, G, H, W), dtype)
            gr = T.match_buffer(gr_handle, (B, G, H, W), dtype)
            h = T.match_buffer(h_handle, (B, C, H, W), dtype)
            chk = T.meta_var(T.Cast("int64", chunk))  # int64 even where a caller binds chunk to a constant
            assert G >= 1 and G <= C and C % G == 0, "gl: expected a group count G that divides C"
            assert chk >= 0, "chunk: expected an int >= 0"
            planes(x, lam, gl, gm, gr, None, None, h, B, C, G, H, W, chk)

    return forward.with_attr("global_symbol", symbol)


def _packed_logits_forward_func(dtype: str, planes, symbol: str):
    """The fused forward PrimFunc around ``planes`` with the three weight logits packed in one
    tensor ``logits`` ``(B, 3 * G, H, W)`` (``al, am, ar`` its channel thirds, as ``chunk(3, dim=1)``
    of a projection makes them), read in place through three strided views."""

    @T.prim_func(s_tir=True)
    def forward(u_handle: T.handle, lam_handle: T.handle, logits_handle: T.handle, gate_handle: T.handle,
                skip_handle: T.handle, y_handle: T.handle, chunk: T.int64):  # fmt: skip
        T.func_attr({"tir.noalias": True})
        B, C, G3, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        u = T.match_buffer(u_handle, (B, C, H, W), dtype)
        lam = T.match_buffer(lam_handle, (B, C, H, W), dtype)
        logits = T.match_buffer(logits_handle, (B, G3, H, W), dtype)
        gate = T.match_buffer(gate_handle, (B, C, H, W), dtype)
        skip = T.match_buffer(skip_handle, (B, C, H, W), dtype)
        y = T.match_buffer(y_handle, (B, C, H, W), dtype)
        G = T.meta_var(G3 // 3)
        chk = T.meta_var(T.Cast("int64", chunk))
        assert G3 % 3 == 0 and G >= 1 and G <= C and C % G == 0, "logits: expected 3 * G channels, G dividing C"
        assert chk >= 0, "chunk: expected an int >= 0"
        strides = T.meta_var([G3 * H * W, H * W, W, T.int64(1)])
        al = T.decl_buffer((B, G, H, W), dtype, data=logits.data, strides=strides, elem_offset=0)
        am = T.decl_buffer((B, G, H, W), dtype, data=logits.data, strides=strides, elem_offset=G * H * W)
        ar = T.decl_buffer((B, G, H, W), dtype, data=logits.data, strides=strides, elem_offset=2 * G * H * W)
        planes(u, lam, al, am, ar, gate, skip, y, B, C, G, H, W, chk)

    return forward.with_attr("global_symbol", symbol)


def _fused_func(dtype: str, planes, symbol: str, packed_logits: bool):
    """The fused forward around ``planes``: logits as three tensors, or packed in one
    (:func:`_packed_logits_forward_func`)."""
    if packed_logits:
        return _packed_logits_forward_func(dtype, planes, packed_logits_name(symbol))
    return _forward_func(dtype, True, planes, symbol)


def scan_forward(direction: str, dtype: str, stream_hints: bool = False):
    """Forward scan ``h = scan(x, lam, gl, gm, gr)`` along ``direction``, storage ``dtype``.

    Arguments: ``x, lam, h``: ``(B, C, H, W)``; ``gl, gm, gr``: ``(B, G, H, W)``; ``chunk``: int64 >= 0.
    Blocks: see :func:`_row_planes`. ``stream_hints`` (CPU only: an LLVM intrinsic): where rows are
    visited bottom to top (:func:`_descends`), the planes are visited in descending order too and
    every line prefetches the one :data:`LINE_PREFETCH_AHEAD` steps ahead (``prefetch_ahead``).
    """
    assert direction in DIRECTIONS, direction
    planes = _row_planes(direction, dtype, False, stream_hints)
    return _forward_func(dtype, False, planes, forward_name(direction))


def fused_scan_forward(direction: str, dtype: str, packed_logits: bool = False, stream_hints: bool = False):
    """Fused forward ``y = scan(u, lam, normalize(al, am, ar)) * gate + u * skip`` along ``direction``.

    Arguments: ``u, lam, gate, skip, y``: ``(B, C, H, W)``; ``al, am, ar`` (weight logits):
    ``(B, G, H, W)``; ``chunk``: int64 >= 0. The blocks of :func:`scan_forward`; the weights are
    normalized where they are read, in float32, and ``h`` lives in the line buffers only: ``y`` is
    the one tensor written, rounded once. ``packed_logits``: the logits come as one ``(B, 3 * G, H,
    W)`` tensor instead (arguments ``u, lam, logits, gate, skip, y, chunk``; symbol
    :func:`packed_logits_name`), so that a model's ``chunk(3, dim=1)`` of its projection is no copy.
    ``stream_hints``: as in :func:`scan_forward`.
    """
    assert direction in DIRECTIONS, direction
    planes = _row_planes(direction, dtype, True, stream_hints)
    return _fused_func(dtype, planes, fused_forward_name(direction), packed_logits)


def _backward_func(dtype: str, body, symbol: str):
    """The PrimFunc of an adjoint around the body macro ``body`` (arguments of
    :func:`scan_backward`): the buffers, the checks every adjoint makes, then ``body(gh, x, lam, gl,
    gm, gr, h, dx, dlam, dgl, dgm, dgr, B, C, G, H, W, chk)``."""

    @T.prim_func(s_tir=True)
    def backward(gh_handle: T.handle, x_handle: T.handle, lam_handle: T.handle, gl_handle: T.handle,
                 gm_handle: T.handle, gr_handle: T.handle, h_handle: T.handle, dx_handle: T.handle,
                 dlam_handle: T.handle, dgl_handle: T.handle, dgm_handle: T.handle, dgr_handle: T.handle,
                 chunk: T.int64):  # fmt: skip
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
        chk = T.meta_var(T.Cast("int64", chunk))  # int64 even where a caller binds chunk to a constant
        assert G >= 1 and G <= C and C % G == 0, "gl: expected a group count G that divides C"
        assert chk >= 0, "chunk: expected an int >= 0"
        body(gh, x, lam, gl, gm, gr, h, dx, dlam, dgl, dgm, dgr, B, C, G, H, W, chk)

    return backward.with_attr("global_symbol", symbol)


def scan_backward(direction: str, dtype: str, stream_hints: bool = False):
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

    ``stream_hints``: as in :func:`scan_forward` (here the adjoint of ``t2b`` descends): slices in
    descending order, and each line prefetches the 7 streams it reads and the 5 it writes
    :data:`LINE_PREFETCH_AHEAD` lines ahead (``prefetch_slice_ahead``, ``prefetch_channel_ahead``).
    """
    assert direction in DIRECTIONS, direction
    descending = stream_hints and _descends(direction, adjoint=True)

    @T.macro
    def body(gh, x, lam, gl, gm, gr, h, dx, dlam, dgl, dgm, dgr, B, C, G, H, W, chk):
        n_lines, length = T.meta_var(_line_geometry(direction, H, W))
        group_size = T.meta_var(C // G)
        for b, g in T.grid(B, G):
            with T.sblock("slice"):
                if descending:
                    vb = T.axis.spatial(B, B - 1 - b)
                    vg = T.axis.spatial(G, G - 1 - g)
                else:
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
                        ahead = T.meta_var(_line_of_step(direction, T.max(vs - LINE_PREFETCH_AHEAD, 0), n_lines))
                        if descending:
                            for q in range(_row_prefetches(length)):
                                with T.sblock("prefetch_slice_ahead"):
                                    vq = T.axis.opaque(_row_prefetches(length), q)
                                    T.evaluate(_prefetch_row(gl, vb, vg, ahead, vq, length))
                                    T.evaluate(_prefetch_row(gm, vb, vg, ahead, vq, length))
                                    T.evaluate(_prefetch_row(gr, vb, vg, ahead, vq, length))
                                    T.evaluate(_prefetch_row(dgl, vb, vg, ahead, vq, length, write=True))
                                    T.evaluate(_prefetch_row(dgm, vb, vg, ahead, vq, length, write=True))
                                    T.evaluate(_prefetch_row(dgr, vb, vg, ahead, vq, length, write=True))
                        for k in range(group_size):
                            with T.sblock("channel"):
                                vk = T.axis.opaque(group_size, k)
                                vc = T.meta_var(vg * group_size + vk)
                                successor = T.meta_var(T.Select(no_successor, group_size, vk))
                                if descending:
                                    for q in range(_row_prefetches(length)):
                                        with T.sblock("prefetch_channel_ahead"):
                                            vq = T.axis.opaque(_row_prefetches(length), q)
                                            T.evaluate(_prefetch_row(gh, vb, vc, ahead, vq, length))
                                            T.evaluate(_prefetch_row(x, vb, vc, ahead, vq, length))
                                            T.evaluate(_prefetch_row(lam, vb, vc, ahead, vq, length))
                                            T.evaluate(_prefetch_row(h, vb, vc, ahead, vq, length))
                                            T.evaluate(_prefetch_row(dx, vb, vc, ahead, vq, length, write=True))
                                            T.evaluate(_prefetch_row(dlam, vb, vc, ahead, vq, length, write=True))
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

    return _backward_func(dtype, body, backward_name(direction))


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

#: Rows ahead that the copies into a column tile prefetch: a tile reads each input 8 rows at a time, a
#: few cache lines per row, a pattern the hardware prefetchers do not follow (each row another
#: stream, at 1024 columns another page). Every other 8x8 block of a tile row prefetches the same
#: columns ``TILE_ROWS_AHEAD`` rows further down, past the plane's last row into the next plane's
#: first rows (planes are contiguous), so that small planes stream from one into the next. 2-core
#: EPYC, ms, before (the next channel's whole plane prefetched at the start of a plane of at most
#: 64x64) -> after: (1, 576, 56, 56) l2r 2.51 -> 1.70, fused 4.73 -> 3.34, adjoint 6.09 -> 4.49;
#: (2, 8, 1024, 1024) l2r 25.9 -> 24.1, fused r2l 49.9 -> 37.1; (1, 16, 256, 256) r2l 1.24 -> 0.95;
#: planes that stay in the L3 pay a little (1 x 32 x 128^2 l2r 0.34 -> 0.36).
TILE_ROWS_AHEAD = 32

#: Rows a multiple of this many bytes apart (a way of a 32 KiB 8-way or 48 KiB 12-way L1 data cache)
#: put the same columns of every row in the same L1 sets, where rows fetched ahead would evict the
#: rows being copied: their prefetches go to the L2 only.
L1_WAY_BYTES = 4096


def _itemsize(dtype) -> int:
    """Bytes per element of ``dtype``."""
    return tvm.DataType(str(dtype)).bits // 8


def _tile_row_prefetches(src, b, c, i0, mem0, outside_l1: bool):
    """Prefetches of columns ``mem0..`` of the 8 rows ``TILE_ROWS_AHEAD`` below rows ``i0..i0+7`` of
    plane ``src[b, c]``, rows past the plane's end running on into the planes after it (clamped to
    the tensor's last row)."""
    B, C, H = src.shape[0], src.shape[1], src.shape[2]
    rows_left = (B * C - (b * C + c)) * H  # rows from this plane's first to the tensor's last
    locality = T.int32(2 if outside_l1 else 3)
    return [
        T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(src[b, c, T.min(i0 + TILE_ROWS_AHEAD + a, rows_left - 1), mem0]),
                           T.int32(0), locality, T.int32(1))  # fmt: skip
        for a in range(V)
    ]


#: Side of the register blocks that stage a tile (8 float32: one AVX2 vector); the rows and
#: columns of a tile beyond a multiple of it are copied one element at a time.
V = 8


def _pair(a, b, lanes):
    return Shuffle([a, b], [tvm.tirx.IntImm("int32", i) for i in lanes])


def _transpose(vectors):
    """The 8 columns of the 8x8 block whose rows are ``vectors`` (8 lanes each), by the two-operand
    shuffles of the classic AVX transpose (unpack pairs, then pairs of pairs, then 128-bit halves)."""
    t = []
    for q in range(0, V, 2):
        t += [_pair(vectors[q], vectors[q + 1], [0, 8, 1, 9, 4, 12, 5, 13]),
              _pair(vectors[q], vectors[q + 1], [2, 10, 3, 11, 6, 14, 7, 15])]  # fmt: skip
    low, high = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    u = []
    for q in (0, 4):
        u += [_pair(t[q], t[q + 2], low), _pair(t[q], t[q + 2], high), _pair(t[q + 1], t[q + 3], low), _pair(t[q + 1], t[q + 3], high)]
    return [_pair(u[e % 4], u[e % 4 + 4], [0, 1, 2, 3, 8, 9, 10, 11] if e < 4 else [4, 5, 6, 7, 12, 13, 14, 15]) for e in range(V)]


def _ramp(base):
    return Ramp(base, tvm.tirx.const(1, "int64"), V)


def _block_columns(src, rows, j0):
    """Columns ``e`` (float32 vectors over the 8 rows) of the 8x8 block whose row ``a`` is
    ``src[*rows[a], j0:j0+8]`` (transposed in ``src``'s dtype, then converted: see :func:`_block_rows`)."""
    columns = _transpose([tvm.tirx.BufferLoad(src, [*row, _ramp(j0)]) for row in rows])
    return columns if src.dtype == ACCUMULATION_DTYPE else [tvm.tirx.Cast(f"{ACCUMULATION_DTYPE}x{V}", c) for c in columns]


def _block_rows(tile, prefix, staged_of_column, i0, dtype):
    """Rows ``a`` (``dtype`` vectors over the 8 memory columns) of the staged block whose memory
    column ``e`` is ``tile[*prefix, staged_of_column(e), i0:i0+8]``."""
    columns = [tvm.tirx.BufferLoad(tile, [*prefix, staged_of_column(e), _ramp(i0)]) for e in range(V)]
    # converted before the shuffles: with conversions inside the shuffle tree, float16 blocks came out
    # wrong (memory columns 4-7), so every shuffle works on vectors as loaded
    if dtype != ACCUMULATION_DTYPE:
        columns = [tvm.tirx.Cast(f"{dtype}x{V}", c) for c in columns]
    return _transpose(columns)


def _tile_copies(lane, dtype):
    """``(stage_tile, store_tile)``: ``stage_tile(name)`` is a macro copying the whole 8x8 blocks of a
    tile from one ``(B, C, H, W)`` tensor into its staged tile, in blocks ``name`` (``store_tile``: the
    other way); a block is 8 vector
    loads, a transpose in registers (shuffles), 8 vector stores. Memory column ``mem0 + e`` is staged
    line ``k0 + lane(e)``: ``lane`` reverses the block where the scan runs down the memory, so the
    vectors themselves always run up (a descending vector access is scalar in TVM's LLVM code
    generator). One loop per tensor, not one loop copying a block of every tensor: that loop kept a
    dozen pointers live and spilled them (106 stack reloads per iteration), and touched 8 rows of each
    tensor, 40 pages at 1024 columns, at once; per tensor, 2-core EPYC: (2, 8, 1024²) l2r forward
    28.0 -> 14.8 ms, fused 45.8 -> 29.1; (1, 576, 56²) 3.18 -> 2.40, fused 6.26 -> 4.17."""

    @T.macro
    def prefetch_rows(src, b, c, i0, mem0, outside_l1):
        prefetches = T.meta_var(_tile_row_prefetches(src, b, c, i0, mem0, outside_l1))
        T.evaluate(prefetches[0])
        T.evaluate(prefetches[1])
        T.evaluate(prefetches[2])
        T.evaluate(prefetches[3])
        T.evaluate(prefetches[4])
        T.evaluate(prefetches[5])
        T.evaluate(prefetches[6])
        T.evaluate(prefetches[7])

    @T.macro
    def stage_block(dst, src, b, c, i0, k0, mem0):
        columns = T.meta_var(_block_columns(src, [(b, c, i0 + a) for a in range(V)], mem0))
        dst[k0 + lane(0), T.ramp(i0, 1, V)] = columns[0]
        dst[k0 + lane(1), T.ramp(i0, 1, V)] = columns[1]
        dst[k0 + lane(2), T.ramp(i0, 1, V)] = columns[2]
        dst[k0 + lane(3), T.ramp(i0, 1, V)] = columns[3]
        dst[k0 + lane(4), T.ramp(i0, 1, V)] = columns[4]
        dst[k0 + lane(5), T.ramp(i0, 1, V)] = columns[5]
        dst[k0 + lane(6), T.ramp(i0, 1, V)] = columns[6]
        dst[k0 + lane(7), T.ramp(i0, 1, V)] = columns[7]
        # every other block: a block is 32 bytes of a row, so each cache line is prefetched once
        if k0 % (2 * V) == 0:
            if src.shape[3] * _itemsize(src.dtype) % L1_WAY_BYTES == 0:
                prefetch_rows(src, b, c, i0, mem0, True)
            else:
                prefetch_rows(src, b, c, i0, mem0, False)

    @T.macro
    def store_block(dst, tile, prefix, b, c, i0, k0, mem0):
        rows = T.meta_var(_block_rows(tile, prefix, lambda e: k0 + lane(e), i0, dtype))
        dst[b, c, i0 + 0, T.ramp(mem0, 1, V)] = rows[0]
        dst[b, c, i0 + 1, T.ramp(mem0, 1, V)] = rows[1]
        dst[b, c, i0 + 2, T.ramp(mem0, 1, V)] = rows[2]
        dst[b, c, i0 + 3, T.ramp(mem0, 1, V)] = rows[3]
        dst[b, c, i0 + 4, T.ramp(mem0, 1, V)] = rows[4]
        dst[b, c, i0 + 5, T.ramp(mem0, 1, V)] = rows[5]
        dst[b, c, i0 + 6, T.ramp(mem0, 1, V)] = rows[6]
        dst[b, c, i0 + 7, T.ramp(mem0, 1, V)] = rows[7]

    # One macro per block name: TVMScript suffixes the blocks of every later call of a macro.
    def stage_tile(name):
        @T.macro
        def copy(dst, src, b, c, row_blocks, col_blocks, kblock_of, mem):
            # block (ib, kb): rows 8 ib.., staged lines 8 kblock_of(kb).., memory columns mem(8 kblock)..
            for ib, kb in T.grid(row_blocks, col_blocks):
                with T.sblock(name):
                    vib, vkb = T.axis.remap("SS", [ib, kb])
                    kblock = T.meta_var(kblock_of(vkb))
                    stage_block(dst, src, b, c, vib * V, kblock * V, mem(kblock * V))

        return copy

    def store_tile(name):
        @T.macro
        def copy(dst, tile, prefix, b, c, row_blocks, col_blocks, kblock_of, mem):
            for ib, kb in T.grid(row_blocks, col_blocks):
                with T.sblock(name):
                    vib, vkb = T.axis.remap("SS", [ib, kb])
                    kblock = T.meta_var(kblock_of(vkb))
                    store_block(dst, tile, prefix, b, c, vib * V, kblock * V, mem(kblock * V))

        return copy

    return stage_tile, store_tile


def _column_tile_planes(direction: str, dtype: str, fused: bool, tile: int):
    """Macro of the forward body of column scans staged through ``tile``-column transposed tiles
    (see :func:`scan_forward_column_tiles`)."""
    reversed_ = is_reversed(direction)
    f32 = ACCUMULATION_DTYPE
    stage_tile, store_tile = _tile_copies((lambda e: V - 1 - e) if reversed_ else (lambda e: e), dtype)
    stage_in = {t: stage_tile(f"stage_in_8x8_{t}") for t in ("x", "lam", "wl", "wm", "wr", "gate", "skip")}
    stage_out = store_tile("stage_out_8x8")

    @T.macro
    def planes(x, lam, wl, wm, wr, gate, skip, out, B, C, G, H, W, chk):
        n_tiles = T.meta_var((W + (tile - 1)) // tile)
        for b, c in T.grid(B, C):
            with T.sblock("plane"):
                vb, vc = T.axis.remap("SS", [b, c])
                if fused:
                    T.reads(x[vb, vc, 0:H, 0:W], lam[vb, vc, 0:H, 0:W], wl[vb, 0:G, 0:H, 0:W], wm[vb, 0:G, 0:H, 0:W],
                            wr[vb, 0:G, 0:H, 0:W], gate[vb, vc, 0:H, 0:W], skip[vb, vc, 0:H, 0:W])  # fmt: skip
                else:
                    T.reads(x[vb, vc, 0:H, 0:W], lam[vb, vc, 0:H, 0:W], wl[vb, 0:G, 0:H, 0:W], wm[vb, 0:G, 0:H, 0:W],
                            wr[vb, 0:G, 0:H, 0:W])  # fmt: skip
                T.writes(out[vb, vc, 0:H, 0:W])
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
                        # first memory column of the steps k0 .. k0 + V - 1 (see _tile_copies)
                        mem = T.meta_var(lambda k0: col(k0 + V - 1) if reversed_ else col(k0))
                        # the blocks of a row of the tile in ascending memory order (r2l: from the
                        # last step's block): descending reads ran r2l at half the speed of l2r
                        ascending = T.meta_var(lambda kb: count // V - 1 - kb if reversed_ else kb)
                        xs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        lams = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        # the weights (plain scan) or their logits (fused scan)
                        wls = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        wms = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        wrs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        hs = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        if fused:
                            gates = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                            skips = T.sblock_alloc_buffer((tile, H + TILE_PAD), f32)
                        full_rows = T.meta_var(H // V * V)
                        full_cols = T.meta_var(count // V * V)
                        blocks = T.meta_var((H // V, count // V, ascending, mem))
                        stage_in["x"](xs, x, vb, vc, *blocks)
                        stage_in["lam"](lams, lam, vb, vc, *blocks)
                        stage_in["wl"](wls, wl, vb, vg, *blocks)
                        stage_in["wm"](wms, wm, vb, vg, *blocks)
                        stage_in["wr"](wrs, wr, vb, vg, *blocks)
                        if fused:
                            stage_in["gate"](gates, gate, vb, vc, *blocks)
                            stage_in["skip"](skips, skip, vb, vc, *blocks)
                        for i, k in T.grid(H - full_rows, count):
                            with T.sblock("stage_in_rows_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                xs[vk, full_rows + vi] = T.Cast(f32, x[vb, vc, full_rows + vi, col(vk)])
                                lams[vk, full_rows + vi] = T.Cast(f32, lam[vb, vc, full_rows + vi, col(vk)])
                                wls[vk, full_rows + vi] = T.Cast(f32, wl[vb, vg, full_rows + vi, col(vk)])
                                wms[vk, full_rows + vi] = T.Cast(f32, wm[vb, vg, full_rows + vi, col(vk)])
                                wrs[vk, full_rows + vi] = T.Cast(f32, wr[vb, vg, full_rows + vi, col(vk)])
                                if fused:
                                    gates[vk, full_rows + vi] = T.Cast(f32, gate[vb, vc, full_rows + vi, col(vk)])
                                    skips[vk, full_rows + vi] = T.Cast(f32, skip[vb, vc, full_rows + vi, col(vk)])
                        for i, k in T.grid(full_rows, count - full_cols):
                            with T.sblock("stage_in_cols_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                xs[full_cols + vk, vi] = T.Cast(f32, x[vb, vc, vi, col(full_cols + vk)])
                                lams[full_cols + vk, vi] = T.Cast(f32, lam[vb, vc, vi, col(full_cols + vk)])
                                wls[full_cols + vk, vi] = T.Cast(f32, wl[vb, vg, vi, col(full_cols + vk)])
                                wms[full_cols + vk, vi] = T.Cast(f32, wm[vb, vg, vi, col(full_cols + vk)])
                                wrs[full_cols + vk, vi] = T.Cast(f32, wr[vb, vg, vi, col(full_cols + vk)])
                                if fused:
                                    gates[full_cols + vk, vi] = T.Cast(f32, gate[vb, vc, vi, col(full_cols + vk)])
                                    skips[full_cols + vk, vi] = T.Cast(f32, skip[vb, vc, vi, col(full_cols + vk)])
                        for k in range(count):
                            with T.sblock("line"):
                                vk = T.axis.opaque(tile, k)
                                restart = T.meta_var(_starts_segment(first + vk, chk))
                                for p in range(H):
                                    with T.sblock("step"):
                                        vp = T.axis.spatial(H, p)
                                        gl, gm, gr = T.meta_var(_weights(fused, wls[vk, vp], wms[vk, vp], wrs[vk, vp], None, H))
                                        propagated = T.meta_var(gl * state[vp] + gm * state[vp + 1] + gr * state[vp + 2])
                                        hs[vk, vp] = lams[vk, vp] * xs[vk, vp] + T.Select(restart, T.float32(0), propagated)
                                for e in range(2):
                                    with T.sblock("ends"):
                                        ve = T.axis.spatial(2, e)
                                        vp = T.meta_var(ve * (H - 1))
                                        gl, gm, gr = T.meta_var(_weights(fused, wls[vk, vp], wms[vk, vp], wrs[vk, vp], vp, H))
                                        propagated = T.meta_var(
                                            _term(vp > 0, gl, state[vp]) + gm * state[vp + 1] + _term(vp + 1 < H, gr, state[vp + 2])
                                        )
                                        hs[vk, vp] = lams[vk, vp] * xs[vk, vp] + T.Select(restart, T.float32(0), propagated)
                                for p in range(H):
                                    with T.sblock("carry"):
                                        vp = T.axis.spatial(H, p)
                                        state[vp + 1] = hs[vk, vp]
                        if fused:
                            # y of the whole tile, in place of h (every column of it is carried already)
                            for k, p in T.grid(count, H):
                                with T.sblock("gate"):
                                    vk, vp = T.axis.remap("SS", [k, p])
                                    hs[vk, vp] = _output(fused, hs[vk, vp], xs[vk, vp], gates[vk, vp], skips[vk, vp])
                        stage_out(out, hs, (), vb, vc, *blocks)
                        for i, k in T.grid(H - full_rows, count):
                            with T.sblock("stage_out_rows_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                out[vb, vc, full_rows + vi, col(vk)] = T.Cast(dtype, hs[vk, full_rows + vi])
                        for i, k in T.grid(full_rows, count - full_cols):
                            with T.sblock("stage_out_cols_tail"):
                                vi, vk = T.axis.remap("SS", [i, k])
                                out[vb, vc, vi, col(full_cols + vk)] = T.Cast(dtype, hs[full_cols + vk, vi])

    return planes


def scan_forward_column_tiles(direction: str, dtype: str, tile: int):
    """Forward column scan (``l2r``/``r2l``) staged through ``tile``-column transposed tiles.

    Same arguments and result as :func:`scan_forward`. Blocks: ``plane`` per ``(b, c)``; inside it
    ``tile`` per ``tile`` columns in scan order, holding ``stage_in_8x8`` (the tile's inputs copied
    with their rows :data:`TILE_ROWS_AHEAD` further prefetched,
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
    return _forward_func(dtype, False, _column_tile_planes(direction, dtype, False, tile), forward_name(direction))


def fused_scan_forward_column_tiles(direction: str, dtype: str, tile: int, packed_logits: bool = False):
    """Fused forward column scan staged like :func:`scan_forward_column_tiles`; arguments as
    :func:`fused_scan_forward`. The logits are staged where the weights are and normalized in the
    ``step``/``ends`` blocks; ``gate`` and ``skip`` are staged too, and a ``gate`` block turns the
    tile's ``h`` into ``y`` before it is copied out (8 staged tensors per tile)."""
    assert is_column(direction), direction
    return _fused_func(dtype, _column_tile_planes(direction, dtype, True, tile), fused_forward_name(direction), packed_logits)


# --- Small planes: channels as vector lanes ---------------------------------------------------------
# Another compute variant for one target (CPU), for the reason given above the column tiles: GSPN-T
# scans thousands of planes of 7x7 to 28x28, whose lines are too short for vectors along them (a
# line of 14 is one vector and a scalar tail of 6; of 7 only a tail) and whose per-plane costs
# (staging a column tile, the line loop) are paid for a few positions. Here ``LANES`` channels are
# scanned together, one per vector lane: their planes are staged transposed (element-major, channel
# lanes minor) with the 8x8 register transposes of the column tiles, every line and direction then
# runs on whole vectors (any position of a line, either end included, is one vector of lanes), and
# the result is transposed back. A plane is read as one flat run of ``H * W`` elements: the staging
# loads index ``[b, c, 0, e]`` with ``e`` up to ``H * W``, which addresses element ``e`` of the
# contiguous plane (the buffers are dense; the tail elements use proper ``[e // W, e % W]``).

#: Channels scanned together, one per float32 vector lane: one AVX-512 register, two AVX2 ones
#: (2-core EPYC, 2304 x 14^2 fused l2r: 0.71 ms with 8 lanes, 0.55 with 16). Staged as two halves
#: of ``V`` planes, one 8x8 transpose each.
LANES = 2 * V

#: The largest planes the lane kernels (:func:`scan_forward_lanes`) are picked for
#: (:func:`gspn_tvm.schedules.cpu.lanes_serve`): staged, the eight tensors of a fused task take
#: ``8 * LANES * 4 * H * W`` bytes (800 KiB at 40 x 40).
LANE_PLANE_ELEMENTS = 1600


def _zero64():
    return tvm.tirx.const(0, "int64")


def _lane_halves(c0, plane_of=lambda c: c):
    """The planes of a task's two halves of lanes (``plane_of`` its channels ``c0 .. c0 + 15``; a
    half is staged by one 8x8 transpose)."""
    return [[plane_of(c0 + half * V + lane) for lane in range(V)] for half in range(LANES // V)]


def _lane_copies(dtype):
    """``(stage, unstage)``: macros moving 8 flat elements of the ``LANES`` planes of a task between a
    ``(B, C, H, W)`` tensor and a staged ``(H * W, LANES)`` float32 buffer, one 8x8 register transpose
    per half of the lanes."""

    @T.macro
    def stage_half(dst, src, b, planes, e0, l0):
        columns = T.meta_var(_block_columns(src, [(b, plane, _zero64()) for plane in planes], e0))
        dst[e0 + 0, T.ramp(l0, 1, V)] = columns[0]
        dst[e0 + 1, T.ramp(l0, 1, V)] = columns[1]
        dst[e0 + 2, T.ramp(l0, 1, V)] = columns[2]
        dst[e0 + 3, T.ramp(l0, 1, V)] = columns[3]
        dst[e0 + 4, T.ramp(l0, 1, V)] = columns[4]
        dst[e0 + 5, T.ramp(l0, 1, V)] = columns[5]
        dst[e0 + 6, T.ramp(l0, 1, V)] = columns[6]
        dst[e0 + 7, T.ramp(l0, 1, V)] = columns[7]

    @T.macro
    def unstage_half(dst, staged, b, c0, e0, l0):
        rows = T.meta_var(_block_rows(staged, (), lambda k: e0 + k, l0, dtype))
        dst[b, c0 + l0 + 0, 0, T.ramp(e0, 1, V)] = rows[0]
        dst[b, c0 + l0 + 1, 0, T.ramp(e0, 1, V)] = rows[1]
        dst[b, c0 + l0 + 2, 0, T.ramp(e0, 1, V)] = rows[2]
        dst[b, c0 + l0 + 3, 0, T.ramp(e0, 1, V)] = rows[3]
        dst[b, c0 + l0 + 4, 0, T.ramp(e0, 1, V)] = rows[4]
        dst[b, c0 + l0 + 5, 0, T.ramp(e0, 1, V)] = rows[5]
        dst[b, c0 + l0 + 6, 0, T.ramp(e0, 1, V)] = rows[6]
        dst[b, c0 + l0 + 7, 0, T.ramp(e0, 1, V)] = rows[7]

    @T.macro
    def stage(dst, src, b, planes, e0):
        # ``planes``: the planes of lanes 0-7 and of lanes 8-15
        stage_half(dst, src, b, planes[0], e0, T.int64(0))
        stage_half(dst, src, b, planes[1], e0, T.int64(V))

    @T.macro
    def unstage(dst, staged, b, c0, e0):
        unstage_half(dst, staged, b, c0, e0, T.int64(0))
        unstage_half(dst, staged, b, c0, e0, T.int64(V))

    return stage, unstage


def _lane_tensor_copies(dtype):
    """``(stage_planes, unstage_planes)``: ``stage_planes(name)`` is a macro staging all whole 8-element
    groups of one tensor's ``LANES`` planes (:func:`_lane_copies`) in a loop of blocks ``name`` of its
    own; ``unstage_planes`` the other way. One loop per tensor for the reason of
    :func:`_tile_copies` (2-core EPYC, (1, 1152, 28²) l2r lane forward 1.11 -> 0.61 ms, 14² and 7²
    planes 5-10% faster); one macro per block name, as there."""
    stage, unstage = _lane_copies(dtype)

    def looped(copy_group):
        def of_name(name):
            @T.macro
            def copy(dst, src, b, planes, n):
                for eb in range(n // V):
                    with T.sblock(name):
                        veb = T.axis.spatial(n // V, eb)
                        copy_group(dst, src, b, planes, veb * V)

            return copy

        return of_name

    return looped(stage), looped(unstage)


def _lane_scan(direction: str, dtype: str, fused: bool):
    """Macro of what a lane task does once its inputs are staged: the lines (``clear``, then per scan
    step ``step``, ``ends``, ``carry``, ``emit``), the fused output (``gate``) and the copy out."""
    _, unstage = _lane_copies(dtype)

    @T.macro
    def scan(xs, lams, wls, wms, wrs, gates, skips, hs, state, current, out, vb, c0, H, W, chk):
        n_lines, length = T.meta_var(_line_geometry(direction, H, W))
        n = T.meta_var(H * W)
        full = T.meta_var(n // V * V)
        for q, lane in T.grid(length + 2, LANES):
            with T.sblock("clear"):
                vq, vl = T.axis.remap("SS", [q, lane])
                state[vq, vl] = T.float32(0)
        for s in range(n_lines):
            with T.sblock("line"):
                vs = T.axis.opaque(n_lines, s)
                line = T.meta_var(_line_of_step(direction, vs, n_lines))
                restart = T.meta_var(_starts_segment(vs, chk))
                for p, lane in T.grid(length, LANES):
                    with T.sblock("step"):
                        vp, vl = T.axis.remap("SS", [p, lane])
                        i, j = T.meta_var(_element(direction, line, vp))
                        e = T.meta_var(i * W + j)
                        gl, gm, gr = T.meta_var(_weights(fused, wls[e, vl], wms[e, vl], wrs[e, vl], None, length))
                        propagated = T.meta_var(gl * state[vp, vl] + gm * state[vp + 1, vl] + gr * state[vp + 2, vl])
                        current[vp, vl] = lams[e, vl] * xs[e, vl] + T.Select(restart, T.float32(0), propagated)
                for end, lane in T.grid(2, LANES):
                    with T.sblock("ends"):
                        vend, vl = T.axis.remap("SS", [end, lane])
                        vp = T.meta_var(vend * (length - 1))  # p = 0 and p = P - 1
                        i, j = T.meta_var(_element(direction, line, vp))
                        e = T.meta_var(i * W + j)
                        gl, gm, gr = T.meta_var(_weights(fused, wls[e, vl], wms[e, vl], wrs[e, vl], vp, length))
                        propagated = T.meta_var(
                            _term(vp > 0, gl, state[vp, vl]) + gm * state[vp + 1, vl]
                            + _term(vp + 1 < length, gr, state[vp + 2, vl])
                        )  # fmt: skip
                        current[vp, vl] = lams[e, vl] * xs[e, vl] + T.Select(restart, T.float32(0), propagated)
                for p, lane in T.grid(length, LANES):
                    with T.sblock("carry"):
                        vp, vl = T.axis.remap("SS", [p, lane])
                        state[vp + 1, vl] = current[vp, vl]
                for p, lane in T.grid(length, LANES):
                    with T.sblock("emit"):
                        vp, vl = T.axis.remap("SS", [p, lane])
                        i, j = T.meta_var(_element(direction, line, vp))
                        hs[i * W + j, vl] = current[vp, vl]
        # the fused y goes to the staged lam (not read again; a block that wrote the buffer it reads
        # would not vectorize)
        result = T.meta_var(lams if fused else hs)
        if fused:
            for e, lane in T.grid(n, LANES):
                with T.sblock("gate"):
                    ve, vl = T.axis.remap("SS", [e, lane])
                    lams[ve, vl] = _output(fused, hs[ve, vl], xs[ve, vl], gates[ve, vl], skips[ve, vl])
        # one block around the copies out: a task with two blocks writing ``out`` directly is not a
        # complete block to TVM's parallel() check
        with T.sblock("lanes_stage_out"):
            for eb in range(n // V):
                with T.sblock("lanes_stage_out_8x8"):
                    veb = T.axis.spatial(n // V, eb)
                    unstage(out, result, vb, c0, veb * V)
            for e, lane in T.grid(n - full, LANES):
                with T.sblock("lanes_stage_out_tail"):
                    ve, vl = T.axis.remap("SS", [e, lane])
                    out[vb, c0 + vl, (full + ve) // W, (full + ve) % W] = T.Cast(dtype, result[full + ve, vl])

    return scan


def _lane_planes(direction: str, dtype: str, fused: bool):
    """Macro of the forward body with ``LANES`` channels per task as vector lanes (see
    :func:`scan_forward_lanes`)."""
    f32 = ACCUMULATION_DTYPE
    stage_planes, _ = _lane_tensor_copies(dtype)
    stage_in = {t: stage_planes(f"lanes_stage_in_8x8_{t}") for t in ("x", "lam", "wl", "wm", "wr", "gate", "skip")}
    scan = _lane_scan(direction, dtype, fused)

    @T.macro
    def planes(x, lam, wl, wm, wr, gate, skip, out, B, C, G, H, W, chk):
        assert C % LANES == 0, "x: expected a channel count divisible by 16 (the lane kernel)"
        _, length = T.meta_var(_line_geometry(direction, H, W))
        n = T.meta_var(H * W)
        full = T.meta_var(n // V * V)
        for b, cb in T.grid(B, C // LANES):
            with T.sblock("lanes"):
                vb, vcb = T.axis.remap("SS", [b, cb])
                c0 = T.meta_var(vcb * LANES)
                if fused:
                    T.reads(x[vb, c0:c0 + LANES, 0:H, 0:W], lam[vb, c0:c0 + LANES, 0:H, 0:W], wl[vb, 0:G, 0:H, 0:W],
                            wm[vb, 0:G, 0:H, 0:W], wr[vb, 0:G, 0:H, 0:W], gate[vb, c0:c0 + LANES, 0:H, 0:W],
                            skip[vb, c0:c0 + LANES, 0:H, 0:W])  # fmt: skip
                else:
                    T.reads(x[vb, c0:c0 + LANES, 0:H, 0:W], lam[vb, c0:c0 + LANES, 0:H, 0:W], wl[vb, 0:G, 0:H, 0:W],
                            wm[vb, 0:G, 0:H, 0:W], wr[vb, 0:G, 0:H, 0:W])  # fmt: skip
                T.writes(out[vb, c0:c0 + LANES, 0:H, 0:W])
                group = T.meta_var(_lane_halves(c0, lambda c: c // (C // G)))
                channel = T.meta_var(_lane_halves(c0))
                xs = T.sblock_alloc_buffer((n, LANES), f32)
                lams = T.sblock_alloc_buffer((n, LANES), f32)
                wls = T.sblock_alloc_buffer((n, LANES), f32)
                wms = T.sblock_alloc_buffer((n, LANES), f32)
                wrs = T.sblock_alloc_buffer((n, LANES), f32)
                hs = T.sblock_alloc_buffer((n, LANES), f32)
                if fused:
                    gates = T.sblock_alloc_buffer((n, LANES), f32)
                    skips = T.sblock_alloc_buffer((n, LANES), f32)
                state = T.sblock_alloc_buffer((length + 2, LANES), f32)
                current = T.sblock_alloc_buffer((length, LANES), f32)
                stage_in["x"](xs, x, vb, channel, n)
                stage_in["lam"](lams, lam, vb, channel, n)
                stage_in["wl"](wls, wl, vb, group, n)
                stage_in["wm"](wms, wm, vb, group, n)
                stage_in["wr"](wrs, wr, vb, group, n)
                if fused:
                    stage_in["gate"](gates, gate, vb, channel, n)
                    stage_in["skip"](skips, skip, vb, channel, n)
                for e, lane in T.grid(n - full, LANES):
                    with T.sblock("lanes_stage_in_tail"):
                        ve, vl = T.axis.remap("SS", [e, lane])
                        i, j = T.meta_var(((full + ve) // W, (full + ve) % W))
                        xs[full + ve, vl] = T.Cast(f32, x[vb, c0 + vl, i, j])
                        lams[full + ve, vl] = T.Cast(f32, lam[vb, c0 + vl, i, j])
                        wls[full + ve, vl] = T.Cast(f32, wl[vb, (c0 + vl) // (C // G), i, j])
                        wms[full + ve, vl] = T.Cast(f32, wm[vb, (c0 + vl) // (C // G), i, j])
                        wrs[full + ve, vl] = T.Cast(f32, wr[vb, (c0 + vl) // (C // G), i, j])
                        if fused:
                            gates[full + ve, vl] = T.Cast(f32, gate[vb, c0 + vl, i, j])
                            skips[full + ve, vl] = T.Cast(f32, skip[vb, c0 + vl, i, j])
                if fused:
                    scan(xs, lams, wls, wms, wrs, gates, skips, hs, state, current, out, vb, c0, H, W, chk)
                else:
                    scan(xs, lams, wls, wms, wrs, None, None, hs, state, current, out, vb, c0, H, W, chk)

    return planes


def _projection(weights, which: int, values, lane):
    """``sum_k weights[which, k, lane] * values[k]``, written out (``len(values)`` terms)."""
    total = weights[which, 0, lane] * values[0]
    for k in range(1, len(values)):
        total = total + weights[which, k, lane] * values[k]
    return total


def _projected_lane_planes(direction: str, dtype: str, S: int):
    """Macro of the fused lane forward whose ``lam``, logits, ``gate`` and ``skip`` are 1x1
    projections of one small ``proxy`` (see :func:`fused_scan_forward_lanes_projected`)."""
    f32 = ACCUMULATION_DTYPE
    stage, _ = _lane_copies(dtype)
    scan = _lane_scan(direction, dtype, True)

    @T.macro
    def planes(u, proxy, w_lam, w_logits, w_gate, w_skip, out, B, C, G, H, W, chk):
        assert C % LANES == 0, "u: expected a channel count divisible by 16 (the lane kernel)"
        _, length = T.meta_var(_line_geometry(direction, H, W))
        n = T.meta_var(H * W)
        full = T.meta_var(n // V * V)
        for b, cb in T.grid(B, C // LANES):
            with T.sblock("lanes"):
                vb, vcb = T.axis.remap("SS", [b, cb])
                c0 = T.meta_var(vcb * LANES)
                T.reads(u[vb, c0:c0 + LANES, 0:H, 0:W], proxy[vb, 0:S, 0:H, 0:W], w_lam[c0:c0 + LANES, 0:S, 0, 0],
                        w_logits[0:3 * G, 0:S, 0, 0], w_gate[c0:c0 + LANES, 0:S, 0, 0], w_skip[c0:c0 + LANES, 0:S, 0, 0])  # fmt: skip
                T.writes(out[vb, c0:c0 + LANES, 0:H, 0:W])
                channel = T.meta_var(_lane_halves(c0))
                xs = T.sblock_alloc_buffer((n, LANES), f32)
                lams = T.sblock_alloc_buffer((n, LANES), f32)
                wls = T.sblock_alloc_buffer((n, LANES), f32)
                wms = T.sblock_alloc_buffer((n, LANES), f32)
                wrs = T.sblock_alloc_buffer((n, LANES), f32)
                gates = T.sblock_alloc_buffer((n, LANES), f32)
                skips = T.sblock_alloc_buffer((n, LANES), f32)
                hs = T.sblock_alloc_buffer((n, LANES), f32)
                state = T.sblock_alloc_buffer((length + 2, LANES), f32)
                current = T.sblock_alloc_buffer((length, LANES), f32)
                # the task's rows of the six projections, transposed: [projection, s, lane]
                weights = T.sblock_alloc_buffer((6, S, LANES), f32)
                for eb in range(n // V):
                    with T.sblock("lanes_stage_in_8x8"):
                        veb = T.axis.spatial(n // V, eb)
                        stage(xs, u, vb, channel, veb * V)
                for e, lane in T.grid(n - full, LANES):
                    with T.sblock("lanes_stage_in_tail"):
                        ve, vl = T.axis.remap("SS", [e, lane])
                        xs[full + ve, vl] = T.Cast(f32, u[vb, c0 + vl, (full + ve) // W, (full + ve) % W])
                for k, lane in T.grid(S, LANES):
                    with T.sblock("lanes_weights"):
                        vk, vl = T.axis.remap("SS", [k, lane])
                        vg = T.meta_var((c0 + vl) // (C // G))
                        weights[0, vk, vl] = T.Cast(f32, w_lam[c0 + vl, vk, 0, 0])
                        weights[1, vk, vl] = T.Cast(f32, w_logits[vg, vk, 0, 0])
                        weights[2, vk, vl] = T.Cast(f32, w_logits[G + vg, vk, 0, 0])
                        weights[3, vk, vl] = T.Cast(f32, w_logits[2 * G + vg, vk, 0, 0])
                        weights[4, vk, vl] = T.Cast(f32, w_gate[c0 + vl, vk, 0, 0])
                        weights[5, vk, vl] = T.Cast(f32, w_skip[c0 + vl, vk, 0, 0])
                for e, lane in T.grid(n, LANES):
                    with T.sblock("project"):
                        ve, vl = T.axis.remap("SS", [e, lane])
                        # element ve of the dense proxy planes (flat, as the staging loads read them),
                        # one broadcast value per proxy channel; the sums written out (S is a constant)
                        values = T.meta_var([T.Cast(f32, proxy[vb, k, 0, ve]) for k in range(S)])
                        lams[ve, vl] = _projection(weights, 0, values, vl)
                        wls[ve, vl] = _projection(weights, 1, values, vl)
                        wms[ve, vl] = _projection(weights, 2, values, vl)
                        wrs[ve, vl] = _projection(weights, 3, values, vl)
                        gates[ve, vl] = _projection(weights, 4, values, vl)
                        skips[ve, vl] = _projection(weights, 5, values, vl)
                scan(xs, lams, wls, wms, wrs, gates, skips, hs, state, current, out, vb, c0, H, W, chk)

    return planes


def fused_scan_forward_lanes_projected(direction: str, dtype: str, proxy_channels: int):
    """The fused lane forward of a mixer whose scan inputs are 1x1 projections of one proxy: ``lam =
    w_lam * proxy``, logits ``w_logits * proxy`` (thirds ``al, am, ar``), ``gate = w_gate * proxy``,
    ``skip = w_skip * proxy`` (1x1 convolutions without bias, summed in float32), computed in the
    kernel per task, never written to memory; then :func:`fused_scan_forward_lanes`.

    Arguments: ``u, y`` ``(B, C, H, W)``; ``proxy`` ``(B, S, H, W)``; ``w_lam, w_gate, w_skip``
    ``(C, S, 1, 1)``; ``w_logits`` ``(3 G, S, 1, 1)``; ``chunk``. ``S = proxy_channels`` is fixed
    in the kernel (the sums are written out). For TVM Relax, which lowers a
    fused scan fed by such convolutions to it (GSPN-T's mixers: S = 8): the projections are 28% of the
    network's time in Relax otherwise, writing four tensors of ``u``'s size and one of three times it
    that the scan reads back. Blocks: ``lanes`` per task; ``lanes_stage_in_*`` (``u`` only),
    ``lanes_weights`` (the task's weight rows, transposed), ``project`` (the six projections at
    every element: per proxy channel one broadcast value times a vector of lanes),
    then the blocks of :func:`scan_forward_lanes`.
    """
    assert direction in DIRECTIONS, direction
    S = int(proxy_channels)
    planes = _projected_lane_planes(direction, dtype, S)

    @T.prim_func(s_tir=True)
    def forward(u_handle: T.handle, proxy_handle: T.handle, w_lam_handle: T.handle, w_logits_handle: T.handle,
                w_gate_handle: T.handle, w_skip_handle: T.handle, y_handle: T.handle, chunk: T.int64):  # fmt: skip
        T.func_attr({"tir.noalias": True})
        B, C, G3, H, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        u = T.match_buffer(u_handle, (B, C, H, W), dtype)
        proxy = T.match_buffer(proxy_handle, (B, S, H, W), dtype)
        w_lam = T.match_buffer(w_lam_handle, (C, S, 1, 1), dtype)
        w_logits = T.match_buffer(w_logits_handle, (G3, S, 1, 1), dtype)
        w_gate = T.match_buffer(w_gate_handle, (C, S, 1, 1), dtype)
        w_skip = T.match_buffer(w_skip_handle, (C, S, 1, 1), dtype)
        y = T.match_buffer(y_handle, (B, C, H, W), dtype)
        G = T.meta_var(G3 // 3)
        chk = T.meta_var(T.Cast("int64", chunk))
        assert G3 % 3 == 0 and G >= 1 and G <= C and C % G == 0, "w_logits: expected 3 * G rows, G dividing C"
        assert chk >= 0, "chunk: expected an int >= 0"
        planes(u, proxy, w_lam, w_logits, w_gate, w_skip, y, B, C, G, H, W, chk)

    return forward.with_attr("global_symbol", projected_name(lanes_name(fused_forward_name(direction))))


def scan_backward_lanes(direction: str, dtype: str):
    """Adjoint scan with ``LANES`` channels per task as vector lanes, for small planes with one weight
    group per channel (``G == C``, asserted; CPU, any direction). Arguments and results as
    :func:`scan_backward`, same arithmetic.

    Blocks: ``lanes`` per ``(b, LANES channels)``; ``lanes_stage_in_8x8_<tensor>`` / ``lanes_stage_in_tail``
    (``gh, x, lam, gl, gm, gr, h`` staged as in :func:`scan_forward_lanes`), ``clear``, ``line`` per
    scan step in reverse order (``load_previous_h``, ``adjoint_step``, ``gradients``: ``dx, dlam``
    and the three weight gradients of the line into staged buffers, ``flow`` for the line before),
    ``lanes_stage_out`` (five tensors). With one channel per group the weight gradients need no sum
    over channels, which is what lets a lane own its weights.
    """
    assert direction in DIRECTIONS, direction
    f32 = ACCUMULATION_DTYPE
    stage_planes, unstage_planes = _lane_tensor_copies(dtype)
    stage_in = {t: stage_planes(f"lanes_stage_in_8x8_{t}") for t in ("gh", "x", "lam", "gl", "gm", "gr", "h")}
    stage_out = {t: unstage_planes(f"lanes_stage_out_8x8_{t}") for t in ("dx", "dlam", "dgl", "dgm", "dgr")}

    @T.macro
    def body(gh, x, lam, gl, gm, gr, h, dx, dlam, dgl, dgm, dgr, B, C, G, H, W, chk):
        n_lines, length = T.meta_var(_line_geometry(direction, H, W))
        n = T.meta_var(H * W)
        full = T.meta_var(n // V * V)
        assert G == C, "gl: the lane adjoint takes one weight group per channel"
        assert C % LANES == 0, "x: expected a channel count divisible by 16 (the lane kernel)"
        for b, cb in T.grid(B, C // LANES):
            with T.sblock("lanes"):
                vb, vcb = T.axis.remap("SS", [b, cb])
                c0 = T.meta_var(vcb * LANES)
                T.reads(gh[vb, c0:c0 + LANES, 0:H, 0:W], x[vb, c0:c0 + LANES, 0:H, 0:W], lam[vb, c0:c0 + LANES, 0:H, 0:W],
                        gl[vb, c0:c0 + LANES, 0:H, 0:W], gm[vb, c0:c0 + LANES, 0:H, 0:W], gr[vb, c0:c0 + LANES, 0:H, 0:W],
                        h[vb, c0:c0 + LANES, 0:H, 0:W])  # fmt: skip
                T.writes(dx[vb, c0:c0 + LANES, 0:H, 0:W], dlam[vb, c0:c0 + LANES, 0:H, 0:W], dgl[vb, c0:c0 + LANES, 0:H, 0:W],
                         dgm[vb, c0:c0 + LANES, 0:H, 0:W], dgr[vb, c0:c0 + LANES, 0:H, 0:W])  # fmt: skip
                channel = T.meta_var(_lane_halves(c0))
                ghs = T.sblock_alloc_buffer((n, LANES), f32)
                xs = T.sblock_alloc_buffer((n, LANES), f32)
                lams = T.sblock_alloc_buffer((n, LANES), f32)
                gls = T.sblock_alloc_buffer((n, LANES), f32)
                gms = T.sblock_alloc_buffer((n, LANES), f32)
                grs = T.sblock_alloc_buffer((n, LANES), f32)
                hs = T.sblock_alloc_buffer((n, LANES), f32)
                dxs = T.sblock_alloc_buffer((n, LANES), f32)
                dlams = T.sblock_alloc_buffer((n, LANES), f32)
                dgls = T.sblock_alloc_buffer((n, LANES), f32)
                dgms = T.sblock_alloc_buffer((n, LANES), f32)
                dgrs = T.sblock_alloc_buffer((n, LANES), f32)
                # flow[t, 1 + p]: w_t[p] * adjoint[p] of the line visited last (zero halos)
                flow = T.sblock_alloc_buffer((3, length + 2, LANES), f32)
                previous_h = T.sblock_alloc_buffer((length + 2, LANES), f32)
                adjoint = T.sblock_alloc_buffer((length, LANES), f32)
                stage_in["gh"](ghs, gh, vb, channel, n)
                stage_in["x"](xs, x, vb, channel, n)
                stage_in["lam"](lams, lam, vb, channel, n)
                stage_in["gl"](gls, gl, vb, channel, n)
                stage_in["gm"](gms, gm, vb, channel, n)
                stage_in["gr"](grs, gr, vb, channel, n)
                stage_in["h"](hs, h, vb, channel, n)
                for e, lane in T.grid(n - full, LANES):
                    with T.sblock("lanes_stage_in_tail"):
                        ve, vl = T.axis.remap("SS", [e, lane])
                        i, j = T.meta_var(((full + ve) // W, (full + ve) % W))
                        ghs[full + ve, vl] = T.Cast(f32, gh[vb, c0 + vl, i, j])
                        xs[full + ve, vl] = T.Cast(f32, x[vb, c0 + vl, i, j])
                        lams[full + ve, vl] = T.Cast(f32, lam[vb, c0 + vl, i, j])
                        gls[full + ve, vl] = T.Cast(f32, gl[vb, c0 + vl, i, j])
                        gms[full + ve, vl] = T.Cast(f32, gm[vb, c0 + vl, i, j])
                        grs[full + ve, vl] = T.Cast(f32, gr[vb, c0 + vl, i, j])
                        hs[full + ve, vl] = T.Cast(f32, h[vb, c0 + vl, i, j])
                for t, q, lane in T.grid(3, length + 2, LANES):
                    with T.sblock("clear"):
                        vt, vq, vl = T.axis.remap("SSS", [t, q, lane])
                        flow[vt, vq, vl] = T.float32(0)
                for q, lane in T.grid(length + 2, LANES):
                    with T.sblock("clear_previous_h"):
                        vq, vl = T.axis.remap("SS", [q, lane])
                        previous_h[vq, vl] = T.float32(0)
                for r in range(n_lines):
                    with T.sblock("line"):
                        vr = T.axis.opaque(n_lines, r)
                        vs = T.meta_var(n_lines - 1 - vr)  # lines are visited in reverse scan order
                        line = T.meta_var(_line_of_step(direction, vs, n_lines))
                        pred = T.meta_var(_line_of_step(direction, T.max(vs - 1, 0), n_lines))
                        no_successor = T.meta_var(T.Or(vs + 1 >= n_lines, _starts_segment(vs + 1, chk)))
                        restart = T.meta_var(_starts_segment(vs, chk))
                        for p, lane in T.grid(length, LANES):
                            with T.sblock("load_previous_h"):
                                vp, vl = T.axis.remap("SS", [p, lane])
                                pi, pj = T.meta_var(_element(direction, pred, vp))
                                previous_h[vp + 1, vl] = hs[pi * W + pj, vl]
                        for p, lane in T.grid(length, LANES):
                            with T.sblock("adjoint_step"):
                                vp, vl = T.axis.remap("SS", [p, lane])
                                i, j = T.meta_var(_element(direction, line, vp))
                                from_successor = T.meta_var(flow[0, vp + 2, vl] + flow[1, vp + 1, vl] + flow[2, vp, vl])
                                adjoint[vp, vl] = ghs[i * W + j, vl] + T.Select(no_successor, T.float32(0), from_successor)
                        for p, lane in T.grid(length, LANES):
                            with T.sblock("gradients"):
                                vp, vl = T.axis.remap("SS", [p, lane])
                                i, j = T.meta_var(_element(direction, line, vp))
                                e = T.meta_var(i * W + j)
                                dxs[e, vl] = lams[e, vl] * adjoint[vp, vl]
                                dlams[e, vl] = xs[e, vl] * adjoint[vp, vl]
                                # gl at p = 0 and gr at p = P - 1 point outside the line: exactly 0
                                dgls[e, vl] = T.Select(T.Or(restart, vp == 0), T.float32(0), adjoint[vp, vl] * previous_h[vp, vl])
                                dgms[e, vl] = T.Select(restart, T.float32(0), adjoint[vp, vl] * previous_h[vp + 1, vl])
                                dgrs[e, vl] = T.Select(T.Or(restart, vp + 1 == length), T.float32(0),
                                                       adjoint[vp, vl] * previous_h[vp + 2, vl])  # fmt: skip
                        for p, lane in T.grid(length, LANES):
                            with T.sblock("flow"):
                                vp, vl = T.axis.remap("SS", [p, lane])
                                i, j = T.meta_var(_element(direction, line, vp))
                                e = T.meta_var(i * W + j)
                                flow[0, vp + 1, vl] = gls[e, vl] * adjoint[vp, vl]
                                flow[1, vp + 1, vl] = gms[e, vl] * adjoint[vp, vl]
                                flow[2, vp + 1, vl] = grs[e, vl] * adjoint[vp, vl]
                with T.sblock("lanes_stage_out"):
                    stage_out["dx"](dx, dxs, vb, c0, n)
                    stage_out["dlam"](dlam, dlams, vb, c0, n)
                    stage_out["dgl"](dgl, dgls, vb, c0, n)
                    stage_out["dgm"](dgm, dgms, vb, c0, n)
                    stage_out["dgr"](dgr, dgrs, vb, c0, n)
                    for e, lane in T.grid(n - full, LANES):
                        with T.sblock("lanes_stage_out_tail"):
                            ve, vl = T.axis.remap("SS", [e, lane])
                            i, j = T.meta_var(((full + ve) // W, (full + ve) % W))
                            dx[vb, c0 + vl, i, j] = T.Cast(dtype, dxs[full + ve, vl])
                            dlam[vb, c0 + vl, i, j] = T.Cast(dtype, dlams[full + ve, vl])
                            dgl[vb, c0 + vl, i, j] = T.Cast(dtype, dgls[full + ve, vl])
                            dgm[vb, c0 + vl, i, j] = T.Cast(dtype, dgms[full + ve, vl])
                            dgr[vb, c0 + vl, i, j] = T.Cast(dtype, dgrs[full + ve, vl])

    return _backward_func(dtype, body, lanes_name(backward_name(direction)))


def scan_forward_lanes(direction: str, dtype: str):
    """Forward scan with ``LANES`` channels per task as vector lanes, for small planes (CPU, any
    direction; the caller picks it for ``H * W <= LANE_PLANE_ELEMENTS`` and ``C % LANES == 0``;
    the kernel itself asserts the latter). Arguments and result as :func:`scan_forward`.

    Blocks: ``lanes`` per ``(b, LANES channels)``; inside it ``lanes_stage_in_8x8_<tensor>`` (8 flat
    elements of the 16 planes per block, one loop per tensor, transposed into ``(H * W, LANES)`` float32 buffers; the
    weights of each lane's group), ``lanes_stage_in_tail`` (the ``H * W mod 8`` last elements),
    ``clear``, ``line`` per scan step (``step``, ``ends``, ``carry`` as in :func:`scan_forward`,
    over positions x lanes, and ``emit`` into the staged output), and ``lanes_stage_out_*``.
    """
    assert direction in DIRECTIONS, direction
    return _forward_func(dtype, False, _lane_planes(direction, dtype, False), lanes_name(forward_name(direction)))


def fused_scan_forward_lanes(direction: str, dtype: str, packed_logits: bool = False):
    """Fused forward with channels as vector lanes (see :func:`scan_forward_lanes`); arguments as
    :func:`fused_scan_forward` (``packed_logits`` too); a ``gate`` block turns the staged ``h`` into
    ``y`` before it is copied out."""
    assert direction in DIRECTIONS, direction
    return _fused_func(dtype, _lane_planes(direction, dtype, True), lanes_name(fused_forward_name(direction)), packed_logits)


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

    Every copy between a tensor and a tile moves whole ``V x V`` blocks (``*_8x8``: vector loads, a
    transpose in registers, vector stores; see :func:`_tile_copies`) and the rest element by element
    (``*_rows_tail``, ``*_cols_tail``). The predecessor's output is staged in its own blocks
    (``stage_predecessor_*``): a whole block of it exists only where every column of the block has a
    predecessor; the column at scan step 0 (clamped, never used) goes through the tail.
    """
    assert is_column(direction), direction
    reversed_ = is_reversed(direction)
    f32 = ACCUMULATION_DTYPE

    stage_tile, store_tile = _tile_copies((lambda e: e) if reversed_ else (lambda e: V - 1 - e), dtype)
    stage = {t: stage_tile(f"stage_weights_8x8_{t}") for t in ("gl", "gm", "gr")}
    stage.update({t: stage_tile(f"stage_in_8x8_{t}") for t in ("gh", "x", "lam")})
    stage["h"] = stage_tile("stage_predecessor_8x8")
    store = {t: store_tile(f"stage_out_8x8_{t}") for t in ("dx", "dlam")}
    store.update({t: store_tile(f"store_weight_grad_8x8_{t}") for t in ("dgl", "dgm", "dgr")})
    shift = 1 if reversed_ else -1  # predecessor column - column

    @T.macro
    def body(gh, x, lam, gl, gm, gr, h, dx, dlam, dgl, dgm, dgr, B, C, G, H, W, chk):
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
                        mem = T.meta_var(lambda k0: col(k0) if reversed_ else col(k0 + V - 1))
                        # the blocks of a row of the tile in ascending memory order (l2r visits its
                        # columns right to left; descending reads are slower, see _column_tile_planes)
                        ascending = T.meta_var(lambda kb, blocks: kb if reversed_ else blocks - 1 - kb)
                        full_rows = T.meta_var(H // V * V)
                        full_cols = T.meta_var(count // V * V)
                        # visits whose step has a predecessor (step >= 1): whole 8-blocks of them read h unclamped
                        full_pred = T.meta_var(T.min(count, W - 1 - first) // V * V)
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
                        blocks = T.meta_var((H // V, count // V, lambda kb: ascending(kb, count // V), mem))
                        stage["gl"](gls, gl, vb, vg, *blocks)
                        stage["gm"](gms, gm, vb, vg, *blocks)
                        stage["gr"](grs, gr, vb, vg, *blocks)
                        for i, m in T.grid(H - full_rows, count):
                            with T.sblock("stage_weights_rows_tail"):
                                vi, vm = T.axis.remap("SS", [i, m])
                                gls[vm, full_rows + vi] = T.Cast(f32, gl[vb, vg, full_rows + vi, col(vm)])
                                gms[vm, full_rows + vi] = T.Cast(f32, gm[vb, vg, full_rows + vi, col(vm)])
                                grs[vm, full_rows + vi] = T.Cast(f32, gr[vb, vg, full_rows + vi, col(vm)])
                        for i, m in T.grid(full_rows, count - full_cols):
                            with T.sblock("stage_weights_cols_tail"):
                                vi, vm = T.axis.remap("SS", [i, m])
                                gls[full_cols + vm, vi] = T.Cast(f32, gl[vb, vg, vi, col(full_cols + vm)])
                                gms[full_cols + vm, vi] = T.Cast(f32, gm[vb, vg, vi, col(full_cols + vm)])
                                grs[full_cols + vm, vi] = T.Cast(f32, gr[vb, vg, vi, col(full_cols + vm)])
                        for t, m, p in T.grid(3, count, H):
                            with T.sblock("clear_weight_grad"):
                                vt, vm, vp = T.axis.remap("SSS", [t, m, p])
                                wgrad[vt, vm, vp] = T.float32(0)
                        for k in range(group_size):
                            with T.sblock("channel"):
                                vk = T.axis.opaque(group_size, k)
                                vc = T.meta_var(vg * group_size + vk)
                                stage["gh"](ghs, gh, vb, vc, *blocks)
                                stage["x"](xs, x, vb, vc, *blocks)
                                stage["lam"](lams, lam, vb, vc, *blocks)
                                stage["h"](hps, h, vb, vc, H // V, full_pred // V,
                                           lambda kb: ascending(kb, full_pred // V), lambda k: mem(k) + shift)  # fmt: skip
                                for i, m in T.grid(H - full_rows, count):
                                    with T.sblock("stage_in_rows_tail"):
                                        vi, vm = T.axis.remap("SS", [i, m])
                                        ghs[vm, full_rows + vi] = T.Cast(f32, gh[vb, vc, full_rows + vi, col(vm)])
                                        xs[vm, full_rows + vi] = T.Cast(f32, x[vb, vc, full_rows + vi, col(vm)])
                                        lams[vm, full_rows + vi] = T.Cast(f32, lam[vb, vc, full_rows + vi, col(vm)])
                                        hps[vm, full_rows + vi] = T.Cast(f32, h[vb, vc, full_rows + vi, pred_col(vm)])
                                for i, m in T.grid(full_rows, count - full_cols):
                                    with T.sblock("stage_in_cols_tail"):
                                        vi, vm = T.axis.remap("SS", [i, m])
                                        ghs[full_cols + vm, vi] = T.Cast(f32, gh[vb, vc, vi, col(full_cols + vm)])
                                        xs[full_cols + vm, vi] = T.Cast(f32, x[vb, vc, vi, col(full_cols + vm)])
                                        lams[full_cols + vm, vi] = T.Cast(f32, lam[vb, vc, vi, col(full_cols + vm)])
                                for i, m in T.grid(full_rows, count - full_pred):
                                    with T.sblock("stage_predecessor_cols_tail"):
                                        vi, vm = T.axis.remap("SS", [i, m])
                                        hps[full_pred + vm, vi] = T.Cast(f32, h[vb, vc, vi, pred_col(full_pred + vm)])
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
                                store["dx"](dx, dxs, (), vb, vc, *blocks)
                                store["dlam"](dlam, dlams, (), vb, vc, *blocks)
                                for i, m in T.grid(H - full_rows, count):
                                    with T.sblock("stage_out_rows_tail"):
                                        vi, vm = T.axis.remap("SS", [i, m])
                                        dx[vb, vc, full_rows + vi, col(vm)] = T.Cast(dtype, dxs[vm, full_rows + vi])
                                        dlam[vb, vc, full_rows + vi, col(vm)] = T.Cast(dtype, dlams[vm, full_rows + vi])
                                for i, m in T.grid(full_rows, count - full_cols):
                                    with T.sblock("stage_out_cols_tail"):
                                        vi, vm = T.axis.remap("SS", [i, m])
                                        dx[vb, vc, vi, col(full_cols + vm)] = T.Cast(dtype, dxs[full_cols + vm, vi])
                                        dlam[vb, vc, vi, col(full_cols + vm)] = T.Cast(dtype, dlams[full_cols + vm, vi])
                        store["dgl"](dgl, wgrad, (0,), vb, vg, *blocks)
                        store["dgm"](dgm, wgrad, (1,), vb, vg, *blocks)
                        store["dgr"](dgr, wgrad, (2,), vb, vg, *blocks)
                        for i, m in T.grid(H - full_rows, count):
                            with T.sblock("store_weight_grad_rows_tail"):
                                vi, vm = T.axis.remap("SS", [i, m])
                                dgl[vb, vg, full_rows + vi, col(vm)] = T.Cast(dtype, wgrad[0, vm, full_rows + vi])
                                dgm[vb, vg, full_rows + vi, col(vm)] = T.Cast(dtype, wgrad[1, vm, full_rows + vi])
                                dgr[vb, vg, full_rows + vi, col(vm)] = T.Cast(dtype, wgrad[2, vm, full_rows + vi])
                        for i, m in T.grid(full_rows, count - full_cols):
                            with T.sblock("store_weight_grad_cols_tail"):
                                vi, vm = T.axis.remap("SS", [i, m])
                                dgl[vb, vg, vi, col(full_cols + vm)] = T.Cast(dtype, wgrad[0, full_cols + vm, vi])
                                dgm[vb, vg, vi, col(full_cols + vm)] = T.Cast(dtype, wgrad[1, full_cols + vm, vi])
                                dgr[vb, vg, vi, col(full_cols + vm)] = T.Cast(dtype, wgrad[2, full_cols + vm, vi])

    return _backward_func(dtype, body, backward_name(direction))
