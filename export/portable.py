"""The portable form of ``gspn::GSPNScan`` and ``gspn::GSPNFusedScan``: the same computation in
standard ONNX operators.

``make_portable(model)`` replaces every ``GSPNScan`` and ``GSPNFusedScan`` node of a model by a
subgraph that any ONNX runtime runs without the custom-operator library. The scan:

    x, lam -> u = x * lam, grouped to (B, G, C/G, H, W); weights to (B, G, 1, H, W)
    -> lines first: (L, B, G, C/G, P), reversed for b2t / r2l so that line s is the s-th scanned
    -> Scan over the lines, carrying the previous line h_{s-1} (B, G, C/G, P):
           h_s = u_s                                             where R(s) = 0
           h_s = u_s + gl_s * h[p-1] + gm_s * h[p] + gr_s * h[p+1]  otherwise
       (gl at p = 0 and gr at p = P-1 are zeroed first: they have no neighbour)
    -> back to (B, C, H, W)

The fused scan (u, lam, al, am, ar, gate, skip) runs the same scan on (x, lam) = (u, lam) with
weights normalized from the logits (sigmoid as 1 / (1 + Exp(-a)); s_l zeroed at p = 0 and s_r at
p = P-1; Div by Max(s_l + s_m + s_r, 1e-7)), then y = h * gate + u * skip.

Scan is used only with axis 0 and forward direction (flips and transposes around it), which every
runtime implements, including ``onnx.reference.ReferenceEvaluator``. All arithmetic is float32;
float16 models cast in and out (the fused scan's weights, h and gate/skip stay float32: y is
rounded once). Every size stays dynamic.

``unroll=True`` emits the lines as straight-line code instead of a ``Scan`` loop, for importers
that have no control flow (TVM Relax's ONNX importer). The number of lines is then fixed by the
model's static shapes; the other dimensions stay dynamic.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gspn_ref.directions import is_column, is_reversed, segment_starts
from gspn_ref.normalize import NORMALIZATION_FLOOR
from gspn_ref.validation import validate_chunk, validate_direction

from .schema import DOMAIN, FUSED_INPUT_NAMES, FUSED_OP_TYPE, INPUT_NAMES, OP_TYPE, register_onnx_schema

MIN_OPSET = 18  # the opset the expansion is written against (Shape with start/end, Pad-18)
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
_ROW_PERM, _ROW_INVERSE = [3, 0, 1, 2, 4], [1, 2, 3, 0, 4]  # (B,G,Cg,H,W) <-> (H,B,G,Cg,W)
_COL_PERM, _COL_INVERSE = [4, 0, 1, 2, 3], [1, 2, 3, 4, 0]  # (B,G,Cg,H,W) <-> (W,B,G,Cg,H)


class _Emitter:
    """Appends NodeProtos with unique output names under one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], *, out: str | None = None, outputs=None, **attrs):
        """Add a node; returns its single output name (or the list given as ``outputs``)."""
        names = outputs if outputs is not None else [out or self.name(op_type.lower())]
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs)
        )
        return names if outputs is not None else names[0]

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        return self.op("Constant", [], value=numpy_helper.from_array(array))


def _shift_lower(e: _Emitter, line: str) -> str:
    """``out[..., p] = line[..., p-1]``, zero at ``p = 0`` (line is 4-D, positions last)."""
    padded = e.op("Pad", [line, e.const([0, 0, 0, 1, 0, 0, 0, 0])])
    return e.op("Slice", [padded, e.const([0]), e.const([-1]), e.const([3])])


def _shift_higher(e: _Emitter, line: str) -> str:
    """``out[..., p] = line[..., p+1]``, zero at ``p = P-1``."""
    padded = e.op("Pad", [line, e.const([0, 0, 0, 0, 0, 0, 0, 1])])
    return e.op("Slice", [padded, e.const([1]), e.const([_INT64_MAX]), e.const([3])])


def _without_outer_weights(e: _Emitter, wl: str, wr: str) -> tuple[str, str]:
    """``wl`` with position 0 and ``wr`` with position P-1 set to zero (frames ``(L, B, G, 1, P)``):
    those weights have no neighbour, so whatever they hold (inf, NaN) must not reach the output
    through a multiplication by the zero padding."""
    wl = e.op("Pad", [e.op("Slice", [wl, e.const([1]), e.const([_INT64_MAX]), e.const([4])]),
                      e.const([0, 0, 0, 0, 1, 0, 0, 0, 0, 0])])  # fmt: skip
    wr = e.op("Pad", [e.op("Slice", [wr, e.const([0]), e.const([-1]), e.const([4])]),
                      e.const([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])])  # fmt: skip
    return wl, wr


def _propagate(e: _Emitter, prev: str, u: str, wl: str, wm: str, wr: str, out=None) -> str:
    """``u + wl * prev[p-1] + wm * prev[p] + wr * prev[p+1]``."""
    acc = e.op("Add", [u, e.op("Mul", [wl, _shift_lower(e, prev)])])
    acc = e.op("Add", [acc, e.op("Mul", [wm, prev])])
    return e.op("Add", [acc, e.op("Mul", [wr, _shift_higher(e, prev)])], out=out)


def _scan_body() -> onnx.GraphProto:
    """Scan body: state h_prev (B, G, Cg, P); scanned u, wl, wm, wr at line s; reset (bool)."""
    e = _Emitter("line/")
    carried = _propagate(e, "h_prev", "u", "wl", "wm", "wr")
    e.op("Where", ["reset", "u", carried], out="h_next")
    e.op("Identity", ["h_next"], out="h_line")

    def line(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    return helper.make_graph(
        e.nodes,
        "gspn_scan_line",
        [line("h_prev"), line("u"), line("wl"), line("wm"), line("wr"),
         helper.make_tensor_value_info("reset", TensorProto.BOOL, [])],
        [line("h_next"), line("h_line")],
    )  # fmt: skip


def _flip_lines(e: _Emitter, t: str) -> str:
    return e.op("Slice", [t, e.const([-1]), e.const([_INT64_MIN]), e.const([0]), e.const([-1])])


def _scan_attributes(node: onnx.NodeProto) -> tuple[str, int]:
    """The validated ``direction`` and ``chunk`` of a GSPNScan or GSPNFusedScan node."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    direction = attrs.get("direction")
    try:
        direction = validate_direction(direction.decode() if isinstance(direction, bytes) else direction)
        chunk = validate_chunk(attrs.get("chunk", 0))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{node.name}: attribute {error}") from error
    return direction, chunk


def _to_line_frames(e: _Emitter, x: str, data: str, weights: list[str], direction: str) -> tuple[str, list[str]]:
    """``data`` (B, C, H, W) -> (L, B, G, C/G, P) and each weight (B, G, H, W) -> (L, B, G, 1, P):
    lines first, in scan order (flipped for b2t / r2l). ``x`` gives B, H and W."""
    perm = _COL_PERM if is_column(direction) else _ROW_PERM
    grouped_shape = e.op("Concat", [e.op("Shape", [x], start=0, end=1), e.op("Shape", [weights[0]], start=1, end=2),
                                    e.const([-1]), e.op("Shape", [x], start=2, end=4)], axis=0)  # fmt: skip
    frames = [e.op("Transpose", [e.op("Reshape", [data, grouped_shape])], perm=perm)]
    frames += [e.op("Transpose", [e.op("Unsqueeze", [w, e.const([2])])], perm=perm) for w in weights]
    if is_reversed(direction):
        frames = [_flip_lines(e, t) for t in frames]
    return frames[0], frames[1:]


def _from_line_frames(e: _Emitter, lines: str, direction: str, like: str, out: str | None = None) -> str:
    """Inverse of :func:`_to_line_frames` for the data: (L, B, G, C/G, P) -> the shape of ``like``."""
    if is_reversed(direction):
        lines = _flip_lines(e, lines)
    grouped = e.op("Transpose", [lines], perm=_COL_INVERSE if is_column(direction) else _ROW_INVERSE)
    return e.op("Reshape", [grouped, e.op("Shape", [like])], out=out)


def _scan_lines(e: _Emitter, u_lines: str, weights: list[str], chunk: int, static_lines: int | None) -> str:
    """The recurrence over lines-first frames (u_lines and ``weights = [wl, wm, wr]`` as made by
    :func:`_to_line_frames`, out-of-line weights already zero): a Scan loop, or ``static_lines``
    unrolled lines."""
    if static_lines is None:
        n_lines = e.op("Squeeze", [e.op("Shape", [u_lines], start=0, end=1)])
        s = e.op("Range", [e.const(0), n_lines, e.const(1)])
        start_of = e.op("Mod", [s, e.const(chunk)]) if chunk > 0 else s
        reset = e.op("Equal", [start_of, e.const(0)])
        h0 = e.op("ConstantOfShape", [e.op("Shape", [u_lines], start=1)],
                  value=numpy_helper.from_array(np.zeros(1, np.float32)))  # fmt: skip
        _, lines = e.op(
            "Scan", [h0, u_lines, *weights, reset],
            outputs=[e.name("h_last"), e.name("lines")], body=_scan_body(), num_scan_inputs=5,
        )  # fmt: skip
        return lines
    line_of = lambda t, s: e.op("Gather", [t, e.const(s)], axis=0)  # (B, G, Cg or 1, P)
    results: list[str] = []
    for s in range(static_lines):
        h_s = line_of(u_lines, s)
        if not segment_starts(s, chunk):
            h_s = _propagate(e, results[-1], h_s, *(line_of(w, s) for w in weights))
        results.append(h_s)
    stacked = [e.op("Unsqueeze", [h, e.const([0])]) for h in results]
    return e.op("Concat", stacked, axis=0) if static_lines > 1 else stacked[0]


def _emit_scan(e: _Emitter, inputs: list[str], direction: str, chunk: int, static_lines: int | None,
               out: str | None) -> str:
    """GSPNScan in float32: ``inputs = (x, lam, gl, gm, gr)``; returns h (B, C, H, W)."""
    x, lam, *weights = inputs
    u_lines, (wl, wm, wr) = _to_line_frames(e, x, e.op("Mul", [x, lam]), weights, direction)
    wl, wr = _without_outer_weights(e, wl, wr)
    return _from_line_frames(e, _scan_lines(e, u_lines, [wl, wm, wr], chunk, static_lines), direction, x, out)


def _sigmoid(e: _Emitter, logits: str) -> str:
    """``1 / (1 + exp(-a))`` to full float32 relative precision. Not ONNX Runtime's Sigmoid: its
    approximation is off by 2e-4 (relative) at -8, by 100% at -17 and is 0 below -18, and the
    normalization divides small sigmoids by their small sum, so their relative error is the weights'."""
    denominator = e.op("Add", [e.op("Exp", [e.op("Neg", [logits])]), e.const(1.0, np.float32)])
    return e.op("Reciprocal", [denominator])


def _emit_fused_scan(e: _Emitter, inputs: list[str], direction: str, chunk: int, static_lines: int | None,
                     out: str | None) -> str:
    """GSPNFusedScan in float32: ``inputs = (u, lam, al, am, ar, gate, skip)``; returns y (B, C, H, W).

    The weights are normalized in the lines-first frame, where the position along the line is the
    last axis whatever the direction and length: sigmoid (:func:`_sigmoid`), s_l zero at p = 0 and s_r at p = P-1
    (the scan's own masking), then divided by max(s_l + s_m + s_r, 1e-7)."""
    u, lam, al, am, ar, gate, skip = inputs
    sigmoids = [_sigmoid(e, a) for a in (al, am, ar)]
    u_lines, (sl, sm, sr) = _to_line_frames(e, u, e.op("Mul", [u, lam]), sigmoids, direction)
    sl, sr = _without_outer_weights(e, sl, sr)
    total = e.op("Max", [e.op("Add", [e.op("Add", [sl, sm]), sr]), e.const(NORMALIZATION_FLOOR, np.float32)])
    weights = [e.op("Div", [s, total]) for s in (sl, sm, sr)]
    h = _from_line_frames(e, _scan_lines(e, u_lines, weights, chunk, static_lines), direction, u)
    return e.op("Add", [e.op("Mul", [h, gate]), e.op("Mul", [u, skip])], out=out)


#: op type -> (number of inputs, float32 emitter writing the output ``out`` (a new name if None)).
_EXPANSIONS = {OP_TYPE: (len(INPUT_NAMES), _emit_scan), FUSED_OP_TYPE: (len(FUSED_INPUT_NAMES), _emit_fused_scan)}


def _expand_node(
    node: onnx.NodeProto, elem_type: int, prefix: str, static_lines: int | None
) -> list[onnx.NodeProto]:
    direction, chunk = _scan_attributes(node)
    n_inputs, emit = _EXPANSIONS[node.op_type]
    if elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        type_name = TensorProto.DataType.Name(elem_type)
        raise ValueError(f"{node.name}: input {node.input[0]!r} must be float32 or float16; got {type_name}")
    if len(node.input) != n_inputs or len(node.output) != 1:
        got = f"{len(node.input)} and {len(node.output)}"
        raise ValueError(f"{node.name}: expected {n_inputs} inputs and 1 output; got {got}")
    e = _Emitter(prefix)
    inputs = list(node.input)
    half = elem_type == TensorProto.FLOAT16
    if half:  # float32 throughout, one rounding of the output
        inputs = [e.op("Cast", [t], to=TensorProto.FLOAT) for t in inputs]
    result = emit(e, inputs, direction, chunk, static_lines, None if half else node.output[0])
    if half:
        e.op("Cast", [result], out=node.output[0], to=TensorProto.FLOAT16)
    return e.nodes


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    return {v.name: v.type for v in (*graph.input, *graph.value_info, *graph.output)} | {
        t.name: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in graph.initializer
    }


def _static_line_count(value_type: onnx.TypeProto, direction: str, name: str) -> int:
    dims = value_type.tensor_type.shape.dim if value_type is not None else []
    axis = 3 if is_column(direction) else 2
    if len(dims) != 4 or not dims[axis].HasField("dim_value"):
        raise ValueError(
            f"unroll=True needs a static number of lines: input '{name}' of a {direction} scan "
            f"has no static size on axis {axis}; export with dynamic=False"
        )
    return int(dims[axis].dim_value)


def make_portable(model: onnx.ModelProto, *, unroll: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with every ``gspn::GSPNScan`` and ``gspn::GSPNFusedScan`` node replaced
    by standard operators.

    The result imports only the default ONNX domain (opset >= 18) for the scans and carries the
    inferred shapes. ``unroll=True`` avoids control flow (see the module docstring).
    """
    register_onnx_schema()
    model = onnx.shape_inference.infer_shapes(model)
    types = _value_types(model)
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if node.domain != DOMAIN or node.op_type not in _EXPANSIONS:
            new_nodes.append(node)
            continue
        x_type = types.get(node.input[0])
        if x_type is None or not x_type.tensor_type.elem_type:
            raise ValueError(f"{node.name}: the element type of input '{node.input[0]}' is unknown")
        static_lines = None
        if unroll:
            direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "")
            static_lines = _static_line_count(x_type, direction, node.input[0])
        prefix = f"{node.name or 'gspn_scan'}_{index}/"
        new_nodes.extend(_expand_node(node, x_type.tensor_type.elem_type, prefix, static_lines))
    graph.ClearField("node")
    graph.node.extend(new_nodes)

    if not any(n.domain == DOMAIN for n in graph.node):
        imports = [o for o in model.opset_import if o.domain != DOMAIN]
        model.ClearField("opset_import")
        model.opset_import.extend(imports)
    default = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None:
        model.opset_import.append(helper.make_opsetid("", MIN_OPSET))
    elif default.version < MIN_OPSET:
        raise ValueError(f"the portable form needs ONNX opset >= {MIN_OPSET}; the model imports opset {default.version}")
    return onnx.shape_inference.infer_shapes(model)
