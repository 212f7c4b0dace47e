"""Whole-model compilation of GSPN models with TVM Relax.

``compile_model`` takes a torch model through ``torch.export`` and TVM's ExportedProgram importer;
``compile_onnx`` takes an ONNX file (custom ``gspn::GSPNScan`` / ``gspn::GSPNFusedScan`` nodes or a
portable form) through TVM's ONNX importer. In both, every scan and every fused scan
(``torch.ops.gspn.fused_scan``) becomes a ``call_tir`` of this project's TensorIR kernel
(``gspn_tvm.compute``, scheduled for the target by ``gspn_tvm.schedules``); convolutions, norms and
the rest are lowered by Relax. The result is one VM executable for the whole model, returned as a
:class:`CompiledModel` that runs on torch tensors (DLPack, no copies) and saves an artifact that
``gspn_tvm.runtime_loader`` runs with the TVM runtime alone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
import tvm
from tvm import relax, tirx
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.torch import from_exported_program
from tvm.runtime.params import save_param_dict_to_file
from tvm.runtime.vm import VirtualMachine
from tvm.sym import Analyzer

from gspn_ref.onnx_op import DOMAIN as ONNX_SCAN_DOMAIN
from gspn_ref.onnx_op import FUSED_INPUT_NAMES, FUSED_OP_TYPE, INPUT_NAMES
from gspn_ref.onnx_op import OP_TYPE as ONNX_SCAN_OP
from gspn_ref.shapes import export_dynamic_shapes
from gspn_ref.validation import validate_chunk, validate_direction

from . import isa, model_cache
from .compute import forward_name, fused_forward_name
from .relax_cpu_schedule import cpu_pipeline
from .runtime_loader import (
    LIBRARY_FILE,
    PARAMS_FILE,
    SIGNATURE_FILE,
    SIGNATURE_VERSION,
    check_inputs,
    device_for,
    param_key,
    sha256_of,
    tensor_sha256,
)
from .threads import use_threads

TORCH_SCAN_OP = "scan.default"  # ``node.target.__name__`` of ``torch.ops.gspn.scan.default``
TORCH_FUSED_SCAN_OP = "fused_scan.default"  # ``torch.ops.gspn.fused_scan.default``
#: ONNX op type -> input names, for the project's custom ONNX operators
ONNX_GSPN_OPS = {ONNX_SCAN_OP: INPUT_NAMES, FUSED_OP_TYPE: FUSED_INPUT_NAMES}
SUPPORTED_TARGET_KINDS = ("llvm", "cuda")
#: Floating dtypes a whole model may use: TVM 0.27's torch importer mixes float32 into float16 and
#: bfloat16 graphs (norms, constants) and Relax then refuses the mixed operators.
SUPPORTED_MODEL_FLOAT_DTYPES = ("float32",)
OP_PATTERN_OPAQUE = 8  # relax's OpPatternKind.kOpaque: FuseOps never merges the scan into a neighbour
logger = logging.getLogger(__name__)


def _use_torch_threads() -> None:
    """Run the calling thread's TVM pool on ``torch.get_num_threads()`` threads (:mod:`gspn_tvm.threads`);
    warn once per count when the pool was created smaller, outside this package."""
    wanted = torch.get_num_threads()
    running = use_threads(wanted)
    if running < wanted:
        logger.warning("gspn_tvm: TVM's thread pool runs %d threads, torch %d: set TVM_NUM_THREADS=%d "
                       "before the first TVM call", running, wanted, wanted)  # fmt: skip


# torch.export gives every dynamic dimension a lower bound of at least 2 (it specializes sizes 0
# and 1); the compiled code has no such limit, so only larger bounds are kept as requirements.
_TORCH_SPECIALIZATION_FLOOR = 2


def _as_target(target: str | dict | tvm.target.Target) -> tvm.target.Target:
    """``"llvm"`` (or ``{"kind": "llvm"}``) without an ``mcpu`` means this machine, as for the scan
    kernels: the x86-64 level its reported CPU features allow (:mod:`gspn_tvm.isa`; a generic x86-64
    build runs far slower, without AVX2/FMA). Name a level as ``mcpu`` (for example
    ``{"kind": "llvm", "mcpu": "x86-64-v2"}``) to build an artifact for other machines. CPU model
    names and ``mattr`` are refused: the artifact records the level's features, and the loader
    refuses it on a machine that lacks one."""
    if target == "llvm" or (isinstance(target, dict) and target.get("kind") == "llvm" and "mcpu" not in target):
        target = {**isa.llvm_target(), **(target if isinstance(target, dict) else {})}
    if not isinstance(target, (str, dict, tvm.target.Target)):
        raise TypeError(f"target: expected 'llvm', a target dict or a tvm.target.Target; got {type(target).__name__}")
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name not in SUPPORTED_TARGET_KINDS:
        raise ValueError(f"target: expected a target of kind {SUPPORTED_TARGET_KINDS}; got {target.kind.name!r}")
    if target.kind.name == "llvm":
        mcpu = target.attrs.get("mcpu")
        if mcpu is not None and str(mcpu) not in isa.LEVELS:
            raise ValueError(
                f"target: mcpu must be one of {', '.join(isa.LEVELS)} (or left out for this machine's level); "
                f"got {str(mcpu)!r}: a CPU model name implies features the machine running the model may lack"
            )
        if target.attrs.get("mattr"):
            raise ValueError(f"target: 'mattr' is not supported (got {list(target.attrs['mattr'])}); name a level as mcpu")
    return target


def _cpu_level(target: tvm.target.Target) -> str | None:
    """The x86-64 level the CPU code of ``target`` is built for (None: LLVM's generic CPU)."""
    host = target if target.kind.name == "llvm" else target.host
    mcpu = host.attrs.get("mcpu") if host is not None else None
    return str(mcpu) if mcpu is not None else None


def _check_model_dtypes(model: torch.nn.Module, args: tuple) -> None:
    """ValueError naming the first floating parameter, buffer or input whose dtype is not supported."""
    named = [*(("parameter " + n, t) for n, t in model.named_parameters()),
             *(("buffer " + n, t) for n, t in model.named_buffers()),
             *((f"example_args[{i}]", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor))]  # fmt: skip
    for what, tensor in named:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.is_floating_point() and dtype not in SUPPORTED_MODEL_FLOAT_DTYPES:
            raise ValueError(
                f"compile_model: {what} has dtype {dtype}; whole-model compilation supports "
                f"{', '.join(SUPPORTED_MODEL_FLOAT_DTYPES)} models only (TVM 0.27's importer mixes float32 "
                "into the graph). Compile model.float() instead; the scan kernels alone run float16 and "
                "bfloat16 through gspn_tvm.enable()"
            )


def scan_kernel(direction: str, dtype: str, chunk: int, target: tvm.target.Target, fused: bool = False,
                packed_logits: bool = False, lanes: bool = False) -> tirx.PrimFunc:  # fmt: skip
    """The project's forward scan (``fused``: the fused scan) for ``direction``/``dtype``, scheduled
    for ``target``, ``chunk`` bound.

    Arguments of the returned PrimFunc: ``x, lam, h`` ``(B, C, H, W)``, ``gl, gm, gr`` ``(B, G, H, W)``
    in the order ``x, lam, gl, gm, gr, h``; fused: ``u, lam, al, am, ar, gate, skip, y`` (``al, am,
    ar`` ``(B, G, H, W)``, the others ``(B, C, H, W)``); fused with ``packed_logits`` (CPU only):
    ``u, lam, logits, gate, skip, y`` (``logits`` ``(B, 3 * G, H, W)``). ``lanes`` (CPU only): the
    small-plane kernel (:func:`gspn_tvm.schedules.cpu.lanes_serve`). Sizes symbolic.
    """
    from .schedules import cpu, cuda

    schedule = cuda if target.kind.name == "cuda" else cpu
    if lanes:
        func = cpu.schedule_fused_forward_lanes(direction, dtype, packed_logits) if fused else cpu.schedule_forward_lanes(direction, dtype)
    elif packed_logits:
        func = cpu.schedule_fused_forward(direction, dtype, packed_logits=True)
    else:
        func = (schedule.schedule_fused_forward if fused else schedule.schedule_forward)(direction, dtype)
    # The chunk of every scan of a model is a constant of the graph: bind it so the kernel folds it.
    chunk_param = func.params[-1]
    func = func.specialize({chunk_param: tirx.IntImm(str(chunk_param.ty), chunk)})
    return func.with_attrs(
        {
            "global_symbol": f"{(fused_forward_name if fused else forward_name)(direction)}_{dtype}_chunk{chunk}"
                             + ("_lanes" if lanes else "") + ("_packed_logits" if packed_logits else ""),
            "tirx.is_scheduled": True,
            "op_pattern": OP_PATTERN_OPAQUE,
        }
    )


#: Largest proxy (channels) whose projections the fused lane kernel computes itself: the sums are
#: written out in the kernel, 6 per element and proxy channel (GSPN-T: 8).
MAX_PROXY_CHANNELS = 32


def projected_scan_kernel(direction: str, dtype: str, chunk: int, proxy_channels: int) -> tirx.PrimFunc:
    """The CPU fused lane kernel that projects ``lam``, the logits, ``gate`` and ``skip`` from a
    proxy of ``proxy_channels`` channels (:func:`gspn_tvm.compute.fused_scan_forward_lanes_projected`),
    scheduled, ``chunk`` bound. Arguments: ``u, proxy, w_lam, w_logits, w_gate, w_skip, y``."""
    from .schedules import cpu

    func = cpu.schedule_fused_forward_lanes_projected(direction, dtype, proxy_channels)
    func = func.specialize({func.params[-1]: tirx.IntImm(str(func.params[-1].ty), chunk)})
    return func.with_attrs({
        "global_symbol": f"{fused_forward_name(direction)}_{dtype}_chunk{chunk}_lanes_projected{proxy_channels}",
        "tirx.is_scheduled": True,
        "op_pattern": OP_PATTERN_OPAQUE,
    })  # fmt: skip


def _conv1x1_of(bb: relax.BlockBuilder, value: relax.Expr):
    """``(data, weight)`` where ``value`` is bound to a plain 1x1 convolution of ``data`` (NCHW, OIHW,
    stride 1, no padding, dilation 1, one group, no bias), else None."""
    call = bb.lookup_binding(value) if isinstance(value, relax.Var) else None
    if not isinstance(call, relax.Call) or not call.op.same_as(tvm.ir.Op.get("relax.nn.conv2d")):
        return None
    attrs, (data, weight) = call.attrs, call.args
    plain = (
        attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW" and attrs.out_layout == "NCHW"
        and int(attrs.groups) == 1 and all(int(v) == 1 for v in (*attrs.strides, *attrs.dilation))
        and all(int(v) == 0 for v in attrs.padding) and str(attrs.out_dtype) in ("", "void", str(data.ty.dtype))
    )  # fmt: skip
    shape = weight.ty.shape
    if not plain or shape is None or [int(v) if isinstance(v, tirx.IntImm) else None for v in shape.values[2:]] != [1, 1]:
        return None
    return data, weight


class ScanEmitter:
    """Emits ``call_tir`` of the scan or the fused scan into a Relax BlockBuilder, one PrimFunc per
    (operator, direction, dtype, chunk)."""

    def __init__(self, target: tvm.target.Target):
        self.target = target
        self._kernels: dict[tuple[bool, str, str, int], relax.GlobalVar] = {}

    def emit(self, bb: relax.BlockBuilder, inputs: Sequence[relax.Expr], direction: str, chunk: int,
             fused: bool = False) -> relax.Var:  # fmt: skip
        """``h`` for ``inputs = (x, lam, gl, gm, gr)``, or (``fused``) ``y`` for ``inputs = (u, lam,
        al, am, ar, gate, skip)``; the output has the type (shape, dtype) of the first input."""
        op, names = (FUSED_OP_TYPE, FUSED_INPUT_NAMES) if fused else (ONNX_SCAN_OP, INPUT_NAMES)
        direction, chunk = validate_direction(direction), validate_chunk(int(chunk))
        x = inputs[0]
        x_type = x.ty
        if x_type.shape is None:
            raise ValueError(
                f"{op}: the shape of {names[0]} is unknown to the importer ({x_type}); "
                "give the model's inputs a rank and shape"
            )
        dtype = str(x_type.dtype)
        for name, value in zip(names[1:], inputs[1:]):
            if str(value.ty.dtype) != dtype:
                raise ValueError(f"{op}: {name} has dtype {value.ty.dtype}; expected {dtype} (the dtype of {names[0]})")
        packed = self._packed_logits(bb, inputs[2:5]) if fused else None
        if packed is not None:
            inputs = [inputs[0], inputs[1], packed, inputs[5], inputs[6]]  # u, lam, logits, gate, skip
        lanes = self._lanes_serve(direction, x_type)
        projected = self._projections(bb, inputs) if packed is not None and self._projected_serve(x_type) else None
        if projected is not None:
            proxy, weights = projected
            inputs = [inputs[0], proxy, *weights]
            proxy_channels = int(proxy.ty.shape.values[1])
            key = ("projected", direction, dtype, chunk, proxy_channels)
            if key not in self._kernels:
                kernel = projected_scan_kernel(direction, dtype, chunk, proxy_channels)
                self._kernels[key] = bb.add_func(kernel, kernel.attrs["global_symbol"])
            return bb.emit(relax.call_tir(self._kernels[key], list(inputs), x_type))
        key = (fused, direction, dtype, chunk, packed is not None, lanes)
        if key not in self._kernels:
            kernel = scan_kernel(direction, dtype, chunk, self.target, fused, packed is not None, lanes)
            self._kernels[key] = bb.add_func(kernel, kernel.attrs["global_symbol"])
        return bb.emit(relax.call_tir(self._kernels[key], list(inputs), x_type))

    def _projections(self, bb: relax.BlockBuilder, inputs: Sequence[relax.Expr]):
        """``(proxy, (w_lam, w_logits, w_gate, w_skip))`` where the packed fused scan's ``lam``,
        logits, ``gate`` and ``skip`` (``inputs[1:5]``, the logits packed) are 1x1 convolutions without bias of one
        ``proxy`` of at most :data:`MAX_PROXY_CHANNELS` channels (GSPN-T's mixers), else None."""
        convolutions = [_conv1x1_of(bb, value) for value in inputs[1:5]]
        if any(c is None for c in convolutions):
            return None
        proxy = convolutions[0][0]
        if not all(c[0].same_as(proxy) for c in convolutions) or proxy.ty.shape is None:
            return None
        channels = proxy.ty.shape.values[1]
        if not isinstance(channels, tirx.IntImm) or int(channels) > MAX_PROXY_CHANNELS:
            return None
        return proxy, tuple(c[1] for c in convolutions)

    def _lanes_serve(self, direction: str, x_type) -> bool:
        """Whether the CPU lane kernel serves a scan of ``x_type``: its channels and plane are
        static and small enough (:func:`gspn_tvm.schedules.cpu.lanes_serve`); compiled for any
        size, the plane kernels run."""
        from .schedules import cpu

        sizes = [int(v) if isinstance(v, tirx.IntImm) else None for v in x_type.shape.values[1:]]
        return self.target.kind.name == "llvm" and None not in sizes and cpu.lanes_serve(direction, *sizes)

    def _projected_serve(self, x_type) -> bool:
        """Whether the CPU lane kernel that projects its inputs serves a scan of ``x_type``: its channel
        count is static (:func:`gspn_tvm.schedules.cpu.projected_lanes_serve`; any plane size)."""
        from .schedules import cpu

        channels = x_type.shape.values[1]
        return self.target.kind.name == "llvm" and isinstance(channels, tirx.IntImm) and cpu.projected_lanes_serve(int(channels))

    def _packed_logits(self, bb: relax.BlockBuilder, logits: Sequence[relax.Expr]) -> relax.Expr | None:
        """``w`` where the logits ``al, am, ar`` are the three outputs, in order, of ``split(w, 3,
        axis=1)`` (a model's ``chunk(3, dim=1)`` of its weight projection) and the target is a CPU:
        the fused kernel then reads ``w`` in place and the split, a copy of ``w``, is dead code."""
        if self.target.kind.name != "llvm":
            return None
        sources = []
        for index, value in enumerate(logits):
            binding = bb.lookup_binding(value) if isinstance(value, relax.Var) else None
            if not isinstance(binding, relax.TupleGetItem) or binding.index != index:
                return None
            sources.append(binding.tuple_value)
        if not all(source.same_as(sources[0]) for source in sources):
            return None
        split = bb.lookup_binding(sources[0]) if isinstance(sources[0], relax.Var) else None
        if not isinstance(split, relax.Call) or not split.op.same_as(tvm.ir.Op.get("relax.split")):
            return None
        w = split.args[0]
        if w.ty.ndim != 4 or w.ty.shape is None or int(split.attrs.axis) % 4 != 1:
            return None
        sections = split.attrs.indices_or_sections
        if isinstance(sections, tirx.IntImm):
            return w if int(sections) == 3 else None
        # split at indices: thirds when they are (k, 2 k) of an axis of 3 k
        analyzer = Analyzer()
        third = w.ty.shape.values[1] // 3
        if len(sections) == 2 and all(analyzer.can_prove_equal(index, (i + 1) * third) for i, index in enumerate(sections)) \
                and analyzer.can_prove_equal(w.ty.shape.values[1], 3 * third):  # fmt: skip
            return w
        return None

    def torch_converter(self, fused: bool = False) -> Callable:
        """Converter of ``torch.ops.gspn.scan.default`` (``fused``: ``torch.ops.gspn.fused_scan.default``)
        for ``from_exported_program``'s custom map."""
        n = len(FUSED_INPUT_NAMES if fused else INPUT_NAMES)

        def convert(node: torch.fx.Node, importer) -> relax.Var:
            inputs = [importer.env[arg] for arg in node.args[:n]]
            direction = node.args[n] if len(node.args) > n else node.kwargs["direction"]
            chunk = node.args[n + 1] if len(node.args) > n + 1 else node.kwargs.get("chunk", 0)
            return self.emit(importer.block_builder, inputs, direction, chunk, fused)

        return convert


class _GSPNOnnxImporter(onnx_frontend.ONNXGraphImporter):
    """TVM's ONNX importer, plus ``gspn::GSPNScan`` (docs/operator.md ("The ONNX operator")) and
    ``gspn::GSPNFusedScan`` ("The fused scan") lowered to the project's kernels."""

    def __init__(self, emitter: ScanEmitter, **kwargs):
        super().__init__(**kwargs)
        self._emitter = emitter

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto):
        control_flow = sorted({node.op_type for node in graph.node if node.op_type in ("Scan", "Loop")})
        if control_flow:
            raise ValueError(
                f"this ONNX model uses {', '.join(control_flow)}, which TVM's Relax ONNX importer does not "
                "implement; export it with mode='custom' (GSPNScan nodes) or mode='portable-unrolled'"
            )
        gspn_nodes = [node for node in graph.node if node.op_type in ONNX_GSPN_OPS]
        for node in gspn_nodes:
            if node.domain != ONNX_SCAN_DOMAIN:
                raise ValueError(f"node {node.name!r}: op {node.op_type} in domain {node.domain!r}; expected {ONNX_SCAN_DOMAIN!r}")
        others = onnx.GraphProto()
        others.node.extend(node for node in graph.node if node.op_type not in ONNX_GSPN_OPS)
        super()._check_for_unsupported_ops(others)

    def _convert_operator(self, op_name: str, inputs: list, attrs: dict, opset: int):
        if op_name == "Range":
            return self._convert_range(inputs, attrs, opset)
        if op_name not in ONNX_GSPN_OPS:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        names = ONNX_GSPN_OPS[op_name]
        if len(inputs) != len(names) or any(value is None for value in inputs):
            raise ValueError(f"{op_name}: expected {len(names)} inputs ({', '.join(names)}); got {len(inputs)}")
        if "direction" not in attrs:
            raise ValueError(f"{op_name}: the attribute 'direction' is required")
        direction = attrs["direction"]
        direction = direction.decode() if isinstance(direction, bytes) else direction
        return self._emitter.emit(self.bb, inputs, direction, attrs.get("chunk", 0), op_name == FUSED_OP_TYPE)


    def _convert_range(self, inputs: list, attrs: dict, opset: int):
        """``Range`` over integer sizes read from shapes: an ``arange`` whose length Relax knows.

        TVM's converter turns a size that comes from ``Shape`` into a tensor, so the ``Range``
        output (GSPN's weight masks over the line length) and everything after it lose their shape.
        """
        graph = [self._nodes, self._params]
        bounds = [_integer_scalar(onnx_frontend.get_constant(value, graph)) for value in inputs]
        if len(bounds) != 3 or any(b is None for b in bounds):
            return super()._convert_operator("Range", inputs, attrs, opset)
        dtype = str(bounds[0].ty)
        start, limit, delta = (tirx.Cast(dtype, b) if str(b.ty) != dtype else b for b in bounds)
        return relax.op.arange(start, limit, delta, dtype)


def _integer_scalar(value) -> tirx.PrimExpr | None:
    """The integer scalar ``value`` (a PrimExpr or a one-element constant) as a PrimExpr, else None."""
    if tvm.ir.is_prim_expr(value):
        return value if str(value.ty).startswith("int") else None
    if isinstance(value, tvm.ir.GenericConst):
        array = value.value.numpy()
        if array.size == 1 and array.dtype.kind == "i":
            return tirx.IntImm(str(array.dtype), int(array.reshape(())))
    return None


def _signature(main: relax.Function, target: tvm.target.Target) -> dict:
    """Inputs (name, shape with dynamic dimensions by name, dtype), lower bounds and the target, as
    JSON-ready data (the parameters and file checksums are added by ``CompiledModel.save``)."""
    num_inputs = int(main.attrs["num_input"]) if "num_input" in main.attrs else len(main.params)
    inputs = []
    for var in main.params[:num_inputs]:
        shape = [int(d) if isinstance(d, tirx.IntImm) else str(d) for d in var.ty.shape.values]
        inputs.append({"name": var.name, "shape": shape, "dtype": str(var.ty.dtype)})
    lower_bounds = {}
    if "tir_var_lower_bound" in main.attrs:
        for name, bound in main.attrs["tir_var_lower_bound"].items():
            if int(bound) > _TORCH_SPECIALIZATION_FLOOR:
                lower_bounds[str(name)] = int(bound)
    level = _cpu_level(target)
    return {
        "version": SIGNATURE_VERSION,
        "device_type": target.kind.name,
        "target": json.loads(str(target)),
        "cpu_level": level,
        "required_cpu_features": sorted(isa.required_features(level)),
        "inputs": inputs,
        "lower_bounds": lower_bounds,
    }


def _readable_dimension_names(signature: dict) -> dict:
    """Rename the dynamic dimensions of the first 4-D input to batch/height/width (and their bounds)."""
    first = next((spec for spec in signature["inputs"] if len(spec["shape"]) == 4), None)
    if first is None:
        return signature
    renames = {}
    for axis, label in ((0, "batch"), (2, "height"), (3, "width")):
        dim = first["shape"][axis]
        if isinstance(dim, str) and dim not in renames and label not in renames.values():
            renames[dim] = label
    taken = {d for spec in signature["inputs"] for d in spec["shape"] if isinstance(d, str)}
    renames = {old: new for old, new in renames.items() if new not in taken or new == old}
    for spec in signature["inputs"]:
        spec["shape"] = [renames.get(d, d) if isinstance(d, str) else d for d in spec["shape"]]
    signature["lower_bounds"] = {renames.get(k, k): v for k, v in signature["lower_bounds"].items()}
    return signature


def _to_torch(value):
    if isinstance(value, tvm.runtime.Tensor):
        return torch.from_dlpack(value)
    return tuple(_to_torch(item) for item in value)


class CompiledModel:
    """A whole model compiled by TVM Relax.

    ``model(*tensors)`` takes torch tensors on the compiled device (shapes and dtypes as in
    ``signature``) and returns torch tensors sharing memory with TVM's outputs (DLPack). ``save(path)``
    writes an artifact folder for ``gspn_tvm.runtime_loader.load_artifact``.
    """

    def __init__(self, executable, params: list, signature: dict, target: tvm.target.Target, param_names: list[str],
                 library_bytes: bytes | None = None):
        self.executable = executable  # a VM executable, or a library loaded from the Relax cache
        self._library_bytes = library_bytes  # that library's file, where it came from the cache
        self.signature = signature
        self.param_names = param_names
        self.target = target
        self.device = device_for(signature["device_type"])
        self._params = [p.copyto(self.device) for p in params]
        self._main = VirtualMachine(executable, self.device)["main"]
        kind = "cuda" if self.device.dlpack_device_type() == tvm.cuda().dlpack_device_type() else "cpu"
        self.torch_device = torch.device(kind, self.device.index) if kind == "cuda" else torch.device("cpu")

    def __call__(self, *tensors: torch.Tensor):
        """Outputs of the model for ``tensors``: a tensor, or a tuple when the model returns several."""
        for spec, t in zip(self.signature["inputs"], tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{spec['name']}: expected a torch.Tensor; got {type(t).__name__}")
            if t.device != self.torch_device:
                raise ValueError(f"{spec['name']}: the model was compiled for {self.torch_device}; got a tensor on {t.device}")
        check_inputs(
            self.signature,
            [tuple(t.shape) for t in tensors],
            [str(t.dtype).removeprefix("torch.") for t in tensors],
        )
        # TVM takes DLPack data only 64-byte aligned; a tensor over a numpy buffer may not be: copy it.
        tensors = [t.contiguous() for t in tensors]
        inputs = [tvm.runtime.from_dlpack(t if t.data_ptr() % 64 == 0 else t.clone()) for t in tensors]
        _use_torch_threads()
        return _to_torch(self._main(*inputs, *self._params))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder ``path`` (``model.so``, ``params.bin``, ``signature.json``).

        The signature records the sha256 of both files and of every parameter (see
        ``gspn_tvm.runtime_loader``); it is written last, so a folder whose save was interrupted
        does not load.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SIGNATURE_FILE).unlink(missing_ok=True)
        if self._library_bytes is not None:  # a loaded library cannot be exported again: its file
            (folder / LIBRARY_FILE).write_bytes(self._library_bytes)
        else:
            self.executable.export_library(str(folder / LIBRARY_FILE))
        keys = [param_key(i, name) for i, name in enumerate(self.param_names)]
        save_param_dict_to_file(dict(zip(keys, self._params)), str(folder / PARAMS_FILE))
        params = []
        for key, param in zip(keys, self._params):
            array = param.numpy()
            params.append({"key": key, "shape": list(array.shape), "dtype": str(param.dtype), "sha256": tensor_sha256(array)})
        signature = {
            **self.signature,
            "params": params,
            "files": {name: sha256_of(folder / name) for name in (LIBRARY_FILE, PARAMS_FILE)},
        }
        (folder / SIGNATURE_FILE).write_text(json.dumps(signature, indent=1))
        return folder

    def __repr__(self) -> str:
        from .runtime_loader import format_shape

        inputs = ", ".join(f"{s['name']}: {format_shape(s['shape'])} {s['dtype']}" for s in self.signature["inputs"])
        return f"CompiledModel({inputs}; target={self.target.kind.name})"


def _build(mod: tvm.IRModule, target: tvm.target.Target) -> CompiledModel:
    """Detach the parameters of ``mod`` (``main`` has them as trailing inputs), compile (or load the
    compiled library from ``$GSPN_RELAX_CACHE_DIR``, :mod:`gspn_tvm.model_cache`), wrap."""
    mod, params = detach_params(mod)
    main = mod["main"]
    num_inputs = int(main.attrs["num_input"])
    param_names = [var.name for var in main.params[num_inputs:]]
    if len(set(param_names)) != len(param_names):
        param_names = [f"{i}_{name}" for i, name in enumerate(param_names)]
    signature = _readable_dimension_names(_signature(main, target))
    pipeline = cpu_pipeline(target) if target.kind.name == "llvm" else relax.get_default_pipeline(target)
    library, library_bytes, _ = model_cache.compile_cached(
        mod, target, lambda: tvm.compile(mod, target=target, relax_pipeline=pipeline))
    return CompiledModel(library, params.get("main", []), signature, target, param_names, library_bytes)


def compile_model(
    model: torch.nn.Module,
    example_args: Any,
    *,
    target: str | dict | tvm.target.Target = "llvm",
    dynamic: bool | tuple | dict = True,
) -> CompiledModel:
    """Compile ``model`` (called as ``model(*example_args)``) for ``target`` with TVM Relax.

    ``dynamic`` means what it means for every exporter of the project
    (:func:`gspn_ref.shapes.export_dynamic_shapes`): ``True``: batch, height and width of 4-D inputs
    (the batch of other inputs) are run-time sizes, except those torch fixes (example sizes of 1,
    sizes the model's code depends on); ``False``: every size is fixed at the example's (other sizes
    raise ``ValueError``); a tuple or dict is passed to ``torch.export.export`` as ``dynamic_shapes``.
    Model parameters are captured as they are now. With ``$GSPN_RELAX_CACHE_DIR`` set, the compiled
    code is kept there and reused for a model of the same structure (:mod:`gspn_tvm.model_cache`).
    """
    target = _as_target(target)
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    _check_model_dtypes(model, args)
    dynamic_shapes = export_dynamic_shapes(dynamic, args)
    # Exported outside no_grad on purpose: a graph traced under no_grad makes Relax's FuseTIR fail
    # (TVM 0.27, "buffer_idx == buffers.size()") on models with two identical GSPN layers.
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    emitter = ScanEmitter(target)
    mod = from_exported_program(
        program,
        keep_params_as_input=True,
        unwrap_unit_return_tuple=True,
        custom_convert_map={TORCH_SCAN_OP: emitter.torch_converter(),
                            TORCH_FUSED_SCAN_OP: emitter.torch_converter(fused=True)},  # fmt: skip
    )
    return _build(mod, target)


def _onnx_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, Sequence[int | str]]) -> dict:
    """``shape_dict`` for TVM's importer: an int fixes a size, a string names a dynamic one."""
    names = [value.name for value in model.graph.input]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise ValueError(f"input_shapes: {unknown} are not inputs of the model; its inputs are {names}")
    symbols: dict[str, tirx.Var] = {}
    shape_dict = {}
    for name, shape in input_shapes.items():
        dims = []
        for dim in shape:
            if isinstance(dim, str):
                dims.append(symbols.setdefault(dim, tirx.Var(dim, "int64")))
            elif isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1:
                dims.append(dim)
            else:
                raise ValueError(f"input_shapes[{name!r}]: expected ints >= 1 or dimension names; got {tuple(shape)}")
        shape_dict[name] = dims
    return shape_dict


def compile_onnx(
    path: str | os.PathLike | onnx.ModelProto,
    *,
    target: str | dict | tvm.target.Target = "llvm",
    input_shapes: dict[str, Sequence[int | str]] | None = None,
) -> CompiledModel:
    """Compile the ONNX model ``path`` (file or ModelProto) for ``target`` with TVM Relax.

    ``gspn::GSPNScan`` and ``gspn::GSPNFusedScan`` nodes become the project's kernels; a portable export must be
    ``mode='portable-unrolled'`` (TVM's ONNX importer has no ``Scan``/``Loop``). The sizes the model
    names (``dim_param``: ``batch``, ``height``, ``width``) stay dynamic; ``input_shapes`` (input
    name -> sizes; an int fixes a size, a string keeps it dynamic under that name) overrides them.
    """
    target = _as_target(target)
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(os.fspath(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    dtypes = {
        value.name: onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        for value in model.graph.input
    }
    for name, dtype in dtypes.items():
        if dtype.startswith(("float", "bfloat")) and dtype not in SUPPORTED_MODEL_FLOAT_DTYPES:
            raise ValueError(
                f"compile_onnx: input {name!r} has dtype {dtype}; whole-model compilation supports "
                f"{', '.join(SUPPORTED_MODEL_FLOAT_DTYPES)} models only; export the float32 model"
            )
    importer = _GSPNOnnxImporter(
        ScanEmitter(target),
        shape_dict=_onnx_input_shapes(model, input_shapes) if input_shapes else None,
        dtype_dict=dtypes,
        keep_params_in_input=True,
    )
    return _build(importer.from_onnx(model.graph, opset), target)
