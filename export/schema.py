"""The ONNX operators ``gspn::GSPNScan`` and ``gspn::GSPNFusedScan`` version 1 (docs/operator.md,
"The ONNX operator" and "The fused scan"), registered with ``onnx``.

Registering the schemas lets the exporter build the nodes, lets ``onnx.checker`` validate their
inputs, types and attributes, and lets ONNX shape inference carry the output type and shape (the
output is shaped like the first input: ``h`` like ``x``, ``y`` like ``u``).
"""

from __future__ import annotations

import onnx
import onnx.defs

from gspn_ref.onnx_op import (
    CHUNK_DEFAULT,
    DIRECTION_VALUES,
    DOMAIN,
    FUSED_INPUT_NAMES,
    FUSED_OP_TYPE,
    FUSED_OUTPUT_NAMES,
    INPUT_NAMES,
    OP_TYPE,
    OP_VERSION,
    OUTPUT_NAMES,
)

_DATA, _WEIGHT = "(B, C, H, W)", "(B, G, H, W)"
_SCAN_DOC = (
    "GSPN line scan h = gspn_scan(x, lam, gl, gm, gr, direction, chunk). x, lam: (B, C, H, W); "
    "gl, gm, gr: (B, G, H, W) with G dividing C; h: (B, C, H, W). float32 or float16 "
    "(accumulated in float32)."
)
_FUSED_DOC = (
    "GSPN fused scan y = gspn_scan(u, lam, normalize_weights(al, am, ar), direction, chunk) * gate "
    "+ u * skip. u, lam, gate, skip: (B, C, H, W); al, am, ar: (B, G, H, W) raw weight logits with "
    "G dividing C; y: (B, C, H, W). float32 or float16 (normalization, scan, gate and skip in "
    "float32, y rounded once)."
)
#: (op type, input names with their shapes, output name, doc) of each operator of the domain.
_OPERATORS = (
    (OP_TYPE, dict(zip(INPUT_NAMES, (_DATA, _DATA, _WEIGHT, _WEIGHT, _WEIGHT))), OUTPUT_NAMES[0], _SCAN_DOC),
    (FUSED_OP_TYPE, dict(zip(FUSED_INPUT_NAMES, (_DATA, _DATA, _WEIGHT, _WEIGHT, _WEIGHT, _DATA, _DATA))),
     FUSED_OUTPUT_NAMES[0], _FUSED_DOC),
)  # fmt: skip


def _infer_output(ctx) -> None:
    # The output has the element type and shape of the first input.
    if ctx.get_num_inputs() >= 1 and ctx.has_input(0):
        ctx.set_output_type(0, ctx.get_input_type(0))


def _make_schema(op_type: str, inputs: dict[str, str], output: str, doc: str) -> onnx.defs.OpSchema:
    param = onnx.defs.OpSchema.FormalParameter
    attribute = onnx.defs.OpSchema.Attribute
    schema = onnx.defs.OpSchema(
        op_type,
        DOMAIN,
        OP_VERSION,
        doc,
        inputs=[param(name, "T", shape) for name, shape in inputs.items()],
        outputs=[param(output, "T", _DATA)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
        attributes=[
            attribute("direction", onnx.defs.OpSchema.AttrType.STRING, ", ".join(DIRECTION_VALUES)),
            attribute("chunk", onnx.helper.make_attribute("chunk", CHUNK_DEFAULT), "0: global, k: restart every k lines"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_output)
    return schema


def register_onnx_schema() -> None:
    """Register ``gspn::GSPNScan`` and ``gspn::GSPNFusedScan`` v1 with ``onnx`` (once per process;
    later calls do nothing)."""
    for op_type, inputs, output, doc in _OPERATORS:
        if not onnx.defs.has(op_type, OP_VERSION, DOMAIN):
            onnx.defs.register_schema(_make_schema(op_type, inputs, output, doc))
