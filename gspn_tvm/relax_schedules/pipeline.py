"""The rules in the order they are tried, as one dlight pass."""

from __future__ import annotations

import tvm
from tvm.s_tir import dlight

from .conv1x1 import Conv1x1
from .depthwise_conv import DepthwiseConv
from .elementwise import Elementwise
from .fallback import ParallelLoops
from .matmul import Matmul
from .reduction import Reduction
from .spatial_conv import SpatialConv


def default_rules() -> list:
    """Most specific first; :class:`ParallelLoops` takes whatever is left (any sizes)."""
    return [Conv1x1(), SpatialConv(), DepthwiseConv(), Matmul(), Reduction(), Elementwise(), ParallelLoops()]


def schedule_passes(target: tvm.target.Target) -> list:
    """The scheduling step: the first rule that applies schedules each PrimFunc not scheduled yet."""
    return [dlight.ApplyDefaultSchedule(*default_rules())]
