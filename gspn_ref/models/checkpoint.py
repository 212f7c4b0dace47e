"""Load checkpoints written by the original GSPN training script, without unpickling code.

The original ``main.py`` saves ``torch.save({'model': ..., 'model_ema': ..., 'optimizer': ...,
'lr_scheduler': ..., 'scaler': ..., 'max_accuracy': ..., 'epoch': ..., 'config': <yacs CfgNode>})``.
Everything in it is tensors and plain data except the config, a yacs ``CfgNode`` (a ``dict``
subclass), which ``torch.load(weights_only=True)`` refuses. :func:`read_checkpoint` first tries
``weights_only=True``; if the file needs more, it reads it again with an unpickler whose only
globals are an explicit allow-list (tensor rebuilding, plain containers, dtypes) plus the name
``yacs.config.CfgNode``, which it maps to a plain dict: no class of the file is imported and no
function outside the allow-list is ever called. Anything else is refused with
:class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Pickled class names read as a yacs config tree (rebuilt as plain dicts).
CONFIG_NODE_CLASSES = ("yacs.config.CfgNode",)

#: How many keys of each kind a state-dict mismatch report lists.
REPORT_KEYS = 10


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file needs a global (class or function) outside the allow-list; nothing of it was run."""


class StateDictMismatchError(ValueError):
    """The state dict does not fit the network: lists missing, unexpected and mis-shaped keys."""


class _ConfigNode(dict):
    """Stand-in for yacs ``CfgNode`` while unpickling: keeps the items, drops yacs' bookkeeping state."""

    def __setstate__(self, state):  # immutability flag, deprecated/renamed key registries: not config
        pass


def _plain(value):
    """Replace every :class:`_ConfigNode` (and ``OrderedDict`` inside one) by a plain ``dict``."""
    if isinstance(value, _ConfigNode):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, dict):
        converted = {k: _plain(v) for k, v in value.items()}
        if type(value) is dict:
            return converted
        value = value.copy()
        value.update(converted)
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "_codecs.encode": __import__("codecs").encode,  # how protocol 2 pickles bytes
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": nn.Parameter,
    }
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_device_tensor_from_cpu_tensor",
    ):
        if hasattr(torch._utils, name):
            allowed[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    for name in CONFIG_NODE_CLASSES:
        allowed[name] = _ConfigNode
    return allowed


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals (never imports a module)."""

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        found = _allowed_globals().get(f"{module}.{name}")
        if found is None:
            raise UnsafeCheckpointError(
                f"refusing to unpickle the global {module}.{name}: a checkpoint may only hold tensors, plain "
                "Python data and the original training script's yacs config; loading this global would run "
                "code of the file's choosing. If you trust the file, load it yourself with "
                "torch.load(..., weights_only=False) and pass the resulting dict"
            )
        return found


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle module: Unpickler (it subclasses it) and load.
_restricted_pickle = types.SimpleNamespace(
    __name__="gspn_ref.models.checkpoint._restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=_restricted_load,
)


def read_checkpoint(source: str | os.PathLike | io.IOBase | bytes) -> Any:
    """Read a ``torch.save`` file safely, on the CPU; yacs config objects come back as plain dicts.

    ``source`` is a path, a binary file object or the file's bytes. Raises
    :class:`UnsafeCheckpointError` if the file needs anything beyond tensors, plain data and a yacs
    ``CfgNode``; nothing of such a file is executed.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"path_or_dict: expected a checkpoint file or a dict; {str(path)!r} is not a file")
        source = path
    elif not hasattr(source, "read"):
        raise TypeError(f"source: expected a path, a binary file or bytes; got {type(source).__name__}")
    start = source.tell() if hasattr(source, "tell") else None
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # needs a global outside torch's allow-list; the restricted unpickler decides
    if start is not None:
        source.seek(start)
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{_describe(source)}: {error}") from None
    return _plain(loaded)


def _describe(source) -> str:
    return str(source) if isinstance(source, Path) else "checkpoint"


def _is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value.values())


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix carried by every key (a state dict saved from a DDP wrapper)."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def select_state_dict(checkpoint: Mapping, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint dict (``'model'``, or ``'model_ema'`` with ``ema=True``)
    or of a bare state dict."""
    key = "model_ema" if ema else "model"
    if key in checkpoint:
        state = checkpoint[key]
        if not _is_state_dict(state):
            raise ValueError(f"path_or_dict: checkpoint[{key!r}] is not a state dict (a mapping of names to tensors)")
        return _strip_module_prefix(state)
    if _is_state_dict(checkpoint):
        if ema:
            raise ValueError("ema: True asks for checkpoint['model_ema'], but a bare state dict was given")
        return _strip_module_prefix(checkpoint)
    keys = ", ".join(map(repr, list(checkpoint)[:12]))
    want = "'model_ema' (ema=True; the training script writes it only when EMA is on)" if ema else "'model'"
    raise ValueError(f"path_or_dict: expected a training checkpoint with {want} or a bare state dict; found keys {keys}")


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:REPORT_KEYS])
    more = f" (and {len(keys) - REPORT_KEYS} more)" if len(keys) > REPORT_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`StateDictMismatchError` unless ``state_dict`` has exactly ``model``'s keys and shapes.

    ``state_dict`` is taken as ``model.load_state_dict`` sees it (after the legacy renames).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} (network: {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        lines = ["the state dict does not fit the network"]
        if missing:
            lines.append(f"missing keys {_listing(missing)}")
        if unexpected:
            lines.append(f"unexpected keys {_listing(unexpected)}")
        if misshaped:
            lines.append(f"mis-shaped keys {_listing(misshaped)}")
        raise StateDictMismatchError("; ".join(lines))


def load_official_checkpoint(
    path_or_dict: str | os.PathLike | Mapping,
    model: nn.Module | None = None,
    *,
    ema: bool = False,
) -> nn.Module:
    """Load a checkpoint of the original training code into a network, strictly; return the network.

    ``path_or_dict``: the training script's checkpoint (a dict with ``'model'``, optionally
    ``'model_ema'`` and ``'config'``), a bare state dict, or the path of a file holding either (read
    with :func:`read_checkpoint`, never unpickling code). ``model``: the network to load into; when
    ``None``, it is built from the checkpoint's ``'config'`` with
    :func:`gspn_ref.models.from_official_config` (a ``ValueError`` if there is none). ``ema=True``
    loads ``'model_ema'``. Older key names are renamed as the original loader does. Raises
    :class:`StateDictMismatchError` listing the first missing, unexpected and mis-shaped keys.
    The network's train/eval mode is left as it is: call ``.eval()`` for inference.
    """
    if not isinstance(ema, bool):
        raise TypeError(f"ema: expected a bool; got {type(ema).__name__}")
    if isinstance(path_or_dict, Mapping):
        checkpoint = _plain(dict(path_or_dict))
    elif isinstance(path_or_dict, (str, os.PathLike, io.IOBase, bytes)):
        checkpoint = read_checkpoint(path_or_dict)
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"path_or_dict: expected the file to hold a dict; it holds a {type(checkpoint).__name__}")
    else:
        raise TypeError(f"path_or_dict: expected a path or a dict; got {type(path_or_dict).__name__}")
    state_dict = select_state_dict(checkpoint, ema=ema)
    if model is None:
        config = checkpoint.get("config")
        if not isinstance(config, Mapping):
            raise ValueError(
                "model: the checkpoint holds no 'config' to build the network from; pass the network, e.g. "
                "load_official_checkpoint(path, gspn_tiny(num_classes=...))"
            )
        from .config import official_config
        from .network import GSPNNet

        model = GSPNNet(official_config(config))
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module or None; got {type(model).__name__}")

    from .network import GSPNNet, Linear2d, upgrade_legacy_keys

    state_dict = dict(state_dict)
    if isinstance(model, GSPNNet):  # compare keys and shapes as load_state_dict will see them
        upgrade_legacy_keys(state_dict, "", model)
        for name, module in model.named_modules():
            key = f"{name}.weight"
            value = state_dict.get(key)
            if isinstance(module, Linear2d) and value is not None and value.dim() == 4 and value.shape[2:] == (1, 1):
                state_dict[key] = value.reshape(value.shape[:2])
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model
