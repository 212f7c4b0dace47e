"""Dynamic-shape specifications shared by the exporters (torch.export for ONNX and for TVM Relax)."""

from __future__ import annotations

import torch


def nchw_dynamic_shapes(example_args: tuple, dim=torch.export.Dim.DYNAMIC) -> tuple:
    """``dynamic_shapes`` for ``torch.export``: batch, height and width of 4-D (NCHW) tensors, the
    batch of other tensors; channels stay static. ``dim`` is ``Dim.DYNAMIC`` or ``Dim.AUTO``."""
    specs = []
    for arg in example_args:
        if isinstance(arg, torch.Tensor) and arg.dim() == 4:
            specs.append({0: dim, 2: dim, 3: dim})
        elif isinstance(arg, torch.Tensor) and arg.dim() >= 1:
            specs.append({0: dim})
        else:
            specs.append(None)
    return tuple(specs)
