"""torch -> ONNX for models that use ``gspn::scan`` and ``gspn::fused_scan``.

The translation of ``torch.ops.gspn.scan`` emits one ``gspn::GSPNScan`` node per scan, that of
``torch.ops.gspn.fused_scan`` one ``gspn::GSPNFusedScan`` node per fused scan. The portable forms
are derived from that graph by ``export.portable.make_portable``, so the custom and the portable
model of one export have the same nodes around the scans.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from onnx import TensorProto, helper

from gspn_ref.shapes import export_dynamic_shapes

from .portable import make_portable
from .schema import (DOMAIN, FUSED_INPUT_NAMES, FUSED_OP_TYPE, FUSED_OUTPUT_NAMES, INPUT_NAMES, OP_TYPE,
                     OP_VERSION, OUTPUT_NAMES, register_onnx_schema)  # fmt: skip

MODES = ("custom", "portable", "portable-unrolled")
ModelShape = tuple[int, int, int, int, int]  # (B, C, G, H, W) of a one-node model
DEFAULT_OPSET = 20

_GSPN_OPSET = onnxscript.values.Opset(DOMAIN, OP_VERSION)


def _translate_scan(x, lam, gl, gm, gr, direction: str, chunk: int = 0):
    """onnxscript translation of ``torch.ops.gspn.scan``: one GSPNScan node."""
    return _GSPN_OPSET.GSPNScan(x, lam, gl, gm, gr, direction=direction, chunk=chunk)


def _translate_fused_scan(u, lam, al, am, ar, gate, skip, direction: str, chunk: int = 0):
    """onnxscript translation of ``torch.ops.gspn.fused_scan``: one GSPNFusedScan node."""
    return _GSPN_OPSET.GSPNFusedScan(u, lam, al, am, ar, gate, skip, direction=direction, chunk=chunk)


_TRANSLATIONS = {
    torch.ops.gspn.scan.default: _translate_scan,
    torch.ops.gspn.fused_scan.default: _translate_fused_scan,
}


def _rename_symbolic_dims(model: onnx.ModelProto) -> None:
    """Give the exporter's symbols (s0, s53, ...) readable names taken from the graph inputs."""
    names: dict[str, str] = {}
    for index, value in enumerate(model.graph.input):
        suffix = "" if index == 0 else f"_{index}"
        dims = value.type.tensor_type.shape.dim
        labels = ["batch", "channels", "height", "width"] if len(dims) == 4 else ["batch"]
        for dim, label in zip(dims, labels):
            if dim.dim_param and re.fullmatch(r"s\d+", dim.dim_param) and dim.dim_param not in names:
                names[dim.dim_param] = label + suffix
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def to_onnx(
    model: torch.nn.Module,
    example_args: Any,
    path: str | os.PathLike,
    *,
    mode: str = "custom",
    dynamic: bool | tuple | dict = True,
    opset: int | None = None,
) -> onnx.ModelProto:
    """Export ``model(*example_args)`` to the ONNX file ``path``; returns the saved ModelProto.

    ``mode``: ``"custom"`` (one ``gspn::GSPNScan`` node per scan, one ``gspn::GSPNFusedScan`` per
    fused scan; run it with
    ``export.session``), ``"portable"`` (standard operators only, a ``Scan`` loop over lines; any
    ONNX runtime), or ``"portable-unrolled"`` (standard operators, no control flow; needs
    ``dynamic=False``). ``dynamic``: as for every exporter of the project
    (:func:`gspn_ref.shapes.export_dynamic_shapes`): ``True`` makes batch, height and width of 4-D
    inputs symbolic wherever the model allows (example sizes of at least 2 avoid torch specializing
    a size-1 dimension), ``False`` fixes them, a tuple or dict is torch.export's ``dynamic_shapes``.
    ``opset``: default ONNX opset (default 20, at least 18).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}; got {mode!r}")
    if mode == "portable-unrolled" and dynamic is not False:
        raise ValueError("mode='portable-unrolled' fixes the number of lines: pass dynamic=False")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < 18:
        raise ValueError(f"opset: expected >= 18; got {opset}")
    register_onnx_schema()
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    try:
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            custom_translation_table=_TRANSLATIONS,
            dynamic_shapes=export_dynamic_shapes(dynamic, args),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    except torch.onnx.OnnxExporterError as error:
        # Invalid arguments of an operator (gspn_ref.validation) surface as what they are.
        if type(error.__cause__) in (ValueError, TypeError):
            raise type(error.__cause__)(str(error.__cause__)) from error
        raise
    proto = program.model_proto
    _rename_symbolic_dims(proto)
    if mode != "custom":
        proto = make_portable(proto, unroll=mode == "portable-unrolled")
    onnx.checker.check_model(proto, full_check=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, os.fspath(path))
    return proto


def _onnx_elem_type(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    try:
        return {"float32": TensorProto.FLOAT, "float": TensorProto.FLOAT,
                "float16": TensorProto.FLOAT16, "half": TensorProto.FLOAT16}[name]  # fmt: skip
    except KeyError:
        raise ValueError(f"dtype: expected float32 or float16; got {dtype!r}") from None


_WEIGHT_NAMES = frozenset(INPUT_NAMES[2:] + FUSED_INPUT_NAMES[2:5])  # the (B, G, H, W) inputs


def _one_node_model(
    name: str, op_type: str, input_names: tuple[str, ...], output_name: str, direction: str, chunk: int, dtype: Any,
    mode: str, shape: ModelShape | None, opset: int,
) -> onnx.ModelProto:
    """A model of one ``op_type`` node ``name`` whose inputs are (B, C, H, W) data but for the weights
    ``{gl, gm, gr}`` / ``{al, am, ar}`` (B, G, H, W); see :func:`scan_model`."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}; got {mode!r}")
    register_onnx_schema()
    elem = _onnx_elem_type(dtype)
    B, C, G, H, W = shape if shape is not None else ("B", "C", "G", "H", "W")
    data_shape, weight_shape = [B, C, H, W], [B, G, H, W]
    inputs = [helper.make_tensor_value_info(name, elem, weight_shape if name in _WEIGHT_NAMES else data_shape)
              for name in input_names]  # fmt: skip
    node = helper.make_node(op_type, list(input_names), [output_name], name=name, domain=DOMAIN,
                            direction=direction, chunk=int(chunk))  # fmt: skip
    graph = helper.make_graph([node], f"gspn_{name}_{direction}",
                              inputs, [helper.make_tensor_value_info(output_name, elem, data_shape)])  # fmt: skip
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OP_VERSION)],
        producer_name="gspn.export",
    )
    if mode != "custom":
        model = make_portable(model, unroll=mode == "portable-unrolled")
    return model


def scan_model(direction: str, chunk: int = 0, dtype: Any = "float32", *, mode: str = "custom",
               shape: ModelShape | None = None, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:  # fmt: skip
    """A model of one scan: inputs ``x, lam`` (B, C, H, W), ``gl, gm, gr`` (B, G, H, W); output h.

    ``shape=(B, C, G, H, W)`` fixes the sizes; by default they are symbolic. ``mode`` as in
    :func:`to_onnx`. Used by tests and benchmarks to run the operator alone.
    """
    return _one_node_model("scan", OP_TYPE, INPUT_NAMES, OUTPUT_NAMES[0], direction, chunk, dtype, mode, shape, opset)


def fused_scan_model(direction: str, chunk: int = 0, dtype: Any = "float32", *, mode: str = "custom",
                     shape: ModelShape | None = None, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:  # fmt: skip
    """A model of one fused scan: inputs ``u, lam`` (B, C, H, W), ``al, am, ar`` (B, G, H, W)
    logits, ``gate, skip`` (B, C, H, W); output y (B, C, H, W). Arguments as for :func:`scan_model`."""
    return _one_node_model("fused_scan", FUSED_OP_TYPE, FUSED_INPUT_NAMES, FUSED_OUTPUT_NAMES[0],
                           direction, chunk, dtype, mode, shape, opset)  # fmt: skip


def _feeds(names: tuple[str, ...], values: tuple) -> dict[str, np.ndarray]:
    to_numpy = lambda t: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return {name: np.ascontiguousarray(to_numpy(t)) for name, t in zip(names, values, strict=True)}


def scan_feeds(x, lam, gl, gm, gr) -> dict[str, np.ndarray]:
    """Input feed of a :func:`scan_model` session from torch tensors or arrays."""
    return _feeds(INPUT_NAMES, (x, lam, gl, gm, gr))


def fused_scan_feeds(u, lam, al, am, ar, gate, skip) -> dict[str, np.ndarray]:
    """Input feed of a :func:`fused_scan_model` session from torch tensors or arrays."""
    return _feeds(FUSED_INPUT_NAMES, (u, lam, al, am, ar, gate, skip))
