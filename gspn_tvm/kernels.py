"""TVM kernels of ``gspn::scan`` and ``gspn::scan_backward`` for the devices TVM serves.

The kernels receive validated tensors (the operator's boundary checks have run), make them
contiguous, allocate the outputs and pass everything to the compiled library through DLPack, with
no copies. float64 has no compiled kernel: it runs the reference (float64 is for gradient checks).
"""

from __future__ import annotations

import torch

from gspn_ref import gspn_scan_backward_ref, gspn_scan_ref
from gspn_ref.directions import line_length

from . import build, compute

_TORCH_TO_TVM = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_libraries: dict[tuple[str, str], object] = {}

# Largest on-chip state of one CUDA thread block of the adjoint (bytes); beyond it the slice does
# not fit in shared memory and the reference runs instead.
CUDA_SHARED_LIMIT = 200 * 1024


def library(device: str, dtype: torch.dtype):
    """The compiled scan library for ``device`` ("cpu"/"cuda") and ``dtype``, loaded once per process."""
    key = (device, _TORCH_TO_TVM[dtype])
    if key not in _libraries:
        _libraries[key] = build.load_scan_library(*key)
    return _libraries[key]


def _backward_shared_bytes(C: int, G: int, length: int) -> int:
    group = C // G
    return 4 * ((group + 1) * 3 * (length + 2) + group * 3 * length + 3 * length + length + 2 * (length + 2))


def has_kernel(x: torch.Tensor, gl: torch.Tensor, direction: str, backward: bool = False) -> bool:
    """True when a compiled kernel serves these inputs (else the reference runs)."""
    if x.dtype not in _TORCH_TO_TVM:
        return False
    if backward and x.device.type == "cuda":
        length = line_length(direction, x.shape[2], x.shape[3])
        return _backward_shared_bytes(x.shape[1], gl.shape[1], length) <= CUDA_SHARED_LIMIT
    return True


def scan_forward(x, lam, gl, gm, gr, direction: str, chunk: int) -> torch.Tensor:
    """``h`` (B, C, H, W) from ``x, lam`` (B, C, H, W) and ``gl, gm, gr`` (B, G, H, W)."""
    if not has_kernel(x, gl, direction):
        return gspn_scan_ref(x, lam, gl, gm, gr, direction, chunk)
    x, lam, gl, gm, gr = (t.contiguous() for t in (x, lam, gl, gm, gr))
    h = torch.empty_like(x)
    library(x.device.type, x.dtype)[compute.forward_name(direction)](x, lam, gl, gm, gr, h, chunk)
    return h


def scan_backward(gh, x, lam, gl, gm, gr, h, direction: str, chunk: int):
    """``(dx, dlam, dgl, dgm, dgr)`` shaped like ``(x, lam, gl, gm, gr)``; ``h`` is the forward output."""
    if not has_kernel(x, gl, direction, backward=True):
        return gspn_scan_backward_ref(gh, x, lam, gl, gm, gr, h, direction, chunk)
    gh, x, lam, gl, gm, gr, h = (t.contiguous() for t in (gh, x, lam, gl, gm, gr, h))
    grads = tuple(torch.empty_like(t) for t in (x, lam, gl, gm, gr))
    library(x.device.type, x.dtype)[compute.backward_name(direction)](gh, x, lam, gl, gm, gr, h, *grads, chunk)
    return grads
