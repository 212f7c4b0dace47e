"""The ONNX operator ``gspn::GSPNScan`` version 1 (docs/operator.md ("The ONNX operator")), registered with ``onnx``.

Registering the schema lets the exporter build the node, lets ``onnx.checker`` validate its inputs,
types and attributes, and lets ONNX shape inference carry the output type and shape (``h`` is
shaped like ``x``).
"""

from __future__ import annotations

import onnx
import onnx.defs

from gspn_ref.onnx_op import CHUNK_DEFAULT, DIRECTION_VALUES, DOMAIN, INPUT_NAMES, OP_TYPE, OP_VERSION, OUTPUT_NAMES

_DOC = (
    "GSPN line scan h = gspn_scan(x, lam, gl, gm, gr, direction, chunk). x, lam: (B, C, H, W); "
    "gl, gm, gr: (B, G, H, W) with G dividing C; h: (B, C, H, W). float32 or float16 "
    "(accumulated in float32)."
)


def _infer_output(ctx) -> None:
    # h has the element type and shape of x.
    if ctx.get_num_inputs() >= 1 and ctx.has_input(0):
        ctx.set_output_type(0, ctx.get_input_type(0))


def _make_schema() -> onnx.defs.OpSchema:
    param = onnx.defs.OpSchema.FormalParameter
    attribute = onnx.defs.OpSchema.Attribute
    shapes = {"x": "(B, C, H, W)", "lam": "(B, C, H, W)", "gl": "(B, G, H, W)",
              "gm": "(B, G, H, W)", "gr": "(B, G, H, W)"}  # fmt: skip
    schema = onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        _DOC,
        inputs=[param(name, "T", shapes[name]) for name in INPUT_NAMES],
        outputs=[param(OUTPUT_NAMES[0], "T", "(B, C, H, W)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
        attributes=[
            attribute("direction", onnx.defs.OpSchema.AttrType.STRING, ", ".join(DIRECTION_VALUES)),
            attribute("chunk", onnx.helper.make_attribute("chunk", CHUNK_DEFAULT), "0: global, k: restart every k lines"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_output)
    return schema


def register_onnx_schema() -> None:
    """Register ``gspn::GSPNScan`` v1 with ``onnx`` (once per process; later calls do nothing)."""
    if onnx.defs.has(OP_TYPE, OP_VERSION, DOMAIN):
        return
    onnx.defs.register_schema(_make_schema())
