"""CPU schedules for what Relax lowers around the scan, as dlight rules (one module per pattern).

Each rule returns ``None`` where its pattern does not match, and the pipeline
(:func:`~.pipeline.schedule_passes`) tries them in order: :class:`Conv1x1`, :class:`SpatialConv`,
:class:`DepthwiseConv`, :class:`Matmul` (register-tiled micro-kernels for static sizes), :class:`Reduction` (norms, means),
:class:`Elementwise`, and :class:`ParallelLoops` for anything left (symbolic sizes included). A rule
whose schedule primitive fails is logged (logger ``gspn_tvm.relax_schedules``) and the next one runs.
"""

from .base import GSPNRule
from .conv1x1 import Conv1x1
from .depthwise_conv import DepthwiseConv
from .elementwise import Elementwise
from .fallback import ParallelLoops
from .matmul import Matmul
from .pipeline import default_rules, schedule_passes
from .reduction import Reduction
from .spatial_conv import SpatialConv

__all__ = [
    "Conv1x1", "DepthwiseConv", "Elementwise", "GSPNRule", "Matmul", "ParallelLoops", "Reduction", "SpatialConv",
    "default_rules", "schedule_passes",
]
