"""Dynamic-shape specifications shared by the exporters (torch.export for ONNX and for TVM Relax).

Both exporters, ``export.to_onnx`` and ``gspn_tvm.compile_model``, take ``dynamic=`` with one
meaning, :func:`export_dynamic_shapes`. The helper lives here, in the lowest layer, because the two
exporters sit in different packages and ``gspn_tvm`` may not import ``export``.
"""

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


def export_dynamic_shapes(dynamic, example_args: tuple):
    """``dynamic_shapes`` for ``torch.export`` from an exporter's ``dynamic=`` argument.

    - ``True``: batch, height and width of 4-D inputs (the batch of other inputs) are run-time sizes
      wherever the model allows (``Dim.AUTO``: torch keeps relations the model imposes, such as
      ``H == W``, and fixes sizes the model's code depends on);
    - ``False``: every size is fixed at the example's;
    - a tuple or dict: passed to ``torch.export`` as it is.
    """
    if dynamic is True:
        return nchw_dynamic_shapes(example_args, torch.export.Dim.AUTO)
    if dynamic is False or dynamic is None:
        return None
    if isinstance(dynamic, (tuple, list, dict)):
        return dynamic
    raise TypeError(f"dynamic: expected True, False or torch.export dynamic_shapes; got {type(dynamic).__name__}")
