"""The paper's GSPN classification networks (GSPN-T/S/B), weight-compatible with the original code.

Build::

    from gspn_ref.models import gspn_tiny, from_official_config, load_official_checkpoint
    net = gspn_tiny(num_classes=1000).eval()              # the published tiny configuration
    net = from_official_config("configs/tiny.yaml")       # an original YAML config (or a dict)
    net = load_official_checkpoint("ckpt_epoch_299.pth")  # a checkpoint of the original training script

Inputs are ``(B, 3, N, N)`` (square). Each token mixer calls ``torch.ops.gspn.scan`` once, so every
kernel of the operator (reference, TVM, ONNX Runtime) serves these networks. See ``docs/models.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

from .checkpoint import (
    StateDictMismatchError,
    UnsafeCheckpointError,
    check_state_dict,
    load_official_checkpoint,
    read_checkpoint,
    select_state_dict,
)
from .config import DEFAULT_CONFIG, OVERRIDE_KEYS, PUBLISHED_CONFIGS, official_config, validate_config
from .network import (
    ClassifierHead,
    DownsampleV1,
    DownsampleV2,
    DownsampleV3,
    DropPath,
    GatedMlp,
    GSPNMixer,
    GSPNNet,
    Linear2d,
    MixerBlock,
    Mlp,
    PatchEmbedV1,
    PatchEmbedV2,
    Stage,
    is_global_block,
    normalize_propagation_weights,
    scan_frames,
    upgrade_legacy_keys,
)


def from_official_config(cfg: str | os.PathLike | Mapping | None = None, **overrides) -> GSPNNet:
    """The network of an original config: ``cfg`` is a YAML path or a dict in the original layout
    (``MODEL.GSPN.*``, ``MODEL.NUM_CLASSES``, ``DATA.IMG_SIZE``), missing keys take the original
    defaults; ``overrides`` set single keys (see :func:`official_config`). Freshly initialized."""
    return GSPNNet(official_config(cfg, **overrides))


def _published(name: str, num_classes: int, overrides) -> GSPNNet:
    return from_official_config(PUBLISHED_CONFIGS[name], num_classes=num_classes, **overrides)


def gspn_tiny(num_classes: int = 1000, **overrides) -> GSPNNet:
    """GSPN-T (``configs/tiny.yaml``): 31.5 M parameters at 1000 classes."""
    return _published("tiny", num_classes, overrides)


def gspn_small(num_classes: int = 1000, **overrides) -> GSPNNet:
    """GSPN-S (``configs/small.yaml``): 50.8 M parameters at 1000 classes."""
    return _published("small", num_classes, overrides)


def gspn_base(num_classes: int = 1000, **overrides) -> GSPNNet:
    """GSPN-B (``configs/base.yaml``): 93.1 M parameters at 1000 classes."""
    return _published("base", num_classes, overrides)


__all__ = [
    "DEFAULT_CONFIG",
    "OVERRIDE_KEYS",
    "PUBLISHED_CONFIGS",
    "ClassifierHead",
    "DownsampleV1",
    "DownsampleV2",
    "DownsampleV3",
    "DropPath",
    "GSPNMixer",
    "GSPNNet",
    "GatedMlp",
    "Linear2d",
    "MixerBlock",
    "Mlp",
    "PatchEmbedV1",
    "PatchEmbedV2",
    "Stage",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "check_state_dict",
    "from_official_config",
    "gspn_base",
    "gspn_small",
    "gspn_tiny",
    "is_global_block",
    "load_official_checkpoint",
    "normalize_propagation_weights",
    "official_config",
    "read_checkpoint",
    "scan_frames",
    "select_state_dict",
    "upgrade_legacy_keys",
    "validate_config",
]
