"""The original GSPN classification config: its layout, its defaults, and the three published variants.

The original code (NVlabs/GSPN, ``classification/config.py``) keeps its settings in a yacs tree;
only these keys reach the network builder::

    MODEL.NUM_CLASSES, MODEL.DROP_PATH_RATE, MODEL.GSPN.*, DATA.IMG_SIZE, TRAIN.USE_CHECKPOINT

A config here is the same tree as plain nested dicts. :func:`official_config` merges a YAML file (or a
dict in that layout) over the defaults, the way the original training script does, and validates it;
every other section of the original config (``AUG``, ``TRAIN.LR``, ...) is accepted and ignored.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: ``classification/config.py`` defaults for the keys the network builder reads.
DEFAULT_CONFIG: dict[str, Any] = {
    "MODEL": {
        "NUM_CLASSES": 1000,
        "DROP_PATH_RATE": 0.1,
        "GSPN": {
            "PATCH_SIZE": 4,
            "IN_CHANS": 3,
            "DEPTHS": [2, 2, 9, 2],
            "EMBED_DIM": 96,
            "D_STATE": 16,
            "RATIO": 2.0,
            "RANK_RATIO": 2.0,
            "ACT_LAYER": "silu",
            "CONV": 3,
            "CONV_BIAS": True,
            "DROP_RATE": 0.0,
            "INIT": "v0",
            "FORWARDTYPE": "v1",
            "MLP_RATIO": 4.0,
            "MLP_ACT_LAYER": "gelu",
            "MLP_DROP_RATE": 0.0,
            "GMLP": False,
            "PATCH_NORM": True,
            "NORM_LAYER": "ln",
            "DOWNSAMPLE": "v2",
            "PATCHEMBED": "v2",
            "POSEMBED": False,
            "ITEMS_EACH_CHUNK": 8,
            "SPECIFIC_GLAYERS": [2, 3],
            "FEAT_SIZE": [56, 28, 14, 7],
        },
    },
    "DATA": {"IMG_SIZE": 224},
    "TRAIN": {"USE_CHECKPOINT": False},
}

_SHIPPED_COMMON = {
    "RATIO": 1.5,
    "CONV": 7,
    "CONV_BIAS": False,
    "ITEMS_EACH_CHUNK": 2,
    "NORM_LAYER": "ln2d",
    "PATCHEMBED": "v2",
    "DOWNSAMPLE": "v3",
}

#: ``classification/configs/{tiny,small,base}.yaml``, as overrides of :data:`DEFAULT_CONFIG`.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "MODEL": {
            "DROP_PATH_RATE": 0.2,
            "GSPN": {**_SHIPPED_COMMON, "EMBED_DIM": 96, "DEPTHS": [2, 2, 7, 2], "D_STATE": 8, "SPECIFIC_GLAYERS": [2, 3]},
        }
    },
    "small": {
        "MODEL": {
            "DROP_PATH_RATE": 0.4,
            "GSPN": {**_SHIPPED_COMMON, "EMBED_DIM": 108, "DEPTHS": [5, 5, 10, 2], "D_STATE": 16, "SPECIFIC_GLAYERS": [3]},
        }
    },
    "base": {
        "MODEL": {
            "DROP_PATH_RATE": 0.5,
            "GSPN": {**_SHIPPED_COMMON, "EMBED_DIM": 120, "DEPTHS": [4, 4, 15, 4], "D_STATE": 8, "SPECIFIC_GLAYERS": [2, 3]},
        }
    },
}

ACTIVATIONS = ("elu", "silu", "gelu", "relu", "sigmoid")
NORM_LAYERS = ("ln2d", "bn")  # "ln" is the config.py default but cannot run (quirk 6)
PATCH_EMBEDS = ("v1", "v2")
DOWNSAMPLES = ("v1", "v2", "v3")

# Keyword overrides accepted by from_official_config / gspn_tiny ...: name -> path in the tree.
_TOP_LEVEL_OVERRIDES = {
    "num_classes": ("MODEL", "NUM_CLASSES"),
    "drop_path_rate": ("MODEL", "DROP_PATH_RATE"),
    "img_size": ("DATA", "IMG_SIZE"),
    "use_checkpoint": ("TRAIN", "USE_CHECKPOINT"),
}
OVERRIDE_KEYS: dict[str, tuple[str, ...]] = {
    **_TOP_LEVEL_OVERRIDES,
    **{key.lower(): ("MODEL", "GSPN", key) for key in DEFAULT_CONFIG["MODEL"]["GSPN"]},
}


def _merge(base: dict, update: Mapping, path: str, strict: bool) -> None:
    """Merge ``update`` into ``base`` in place; unknown keys raise under ``strict`` paths only."""
    for key, value in update.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in base:
            if strict:
                known = ", ".join(sorted(base))
                raise ValueError(f"{where}: not a key of the original config (known keys: {known})")
            continue
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise TypeError(f"{where}: expected a mapping of keys; got {type(value).__name__} {value!r}")
            _merge(base[key], value, where, strict=strict or where == "MODEL.GSPN")
        else:
            base[key] = copy.deepcopy(value)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read an original YAML config, following its ``BASE: [...]`` files (paths relative to it)."""
    import yaml  # imported here: keep ``import gspn_ref`` cheap

    path = path.resolve()
    if path in seen:
        raise ValueError(f"cfg: the BASE files of {seen[0]} include each other ({path})")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"cfg: expected a YAML mapping in {path}; got {type(data).__name__}")
    merged: dict = {}
    for base in data.pop("BASE", None) or []:
        if base:
            _deep_update(merged, _read_yaml(path.parent / base, seen + (path,)))
    _deep_update(merged, data)
    return merged


def _deep_update(base: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def _to_plain(value):
    """Mappings (including yacs ``CfgNode``) to plain dicts, tuples to lists, recursively."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def official_config(cfg: str | os.PathLike | Mapping | None = None, **overrides) -> dict:
    """The full, validated config: defaults, then ``cfg`` (YAML path or dict), then ``overrides``.

    ``cfg`` is an original YAML config file (``BASE`` lists followed) or a dict in the original layout
    (``{"MODEL": {"GSPN": {...}, "NUM_CLASSES": ...}, "DATA": {"IMG_SIZE": ...}}``); missing keys
    keep the ``classification/config.py`` defaults. ``overrides`` are keyword names for single keys:
    ``num_classes``, ``drop_path_rate``, ``img_size``, ``use_checkpoint``, or any ``MODEL.GSPN`` key in
    lower case (``embed_dim=16``, ``depths=[2, 2, 7, 2]``, ...).
    """
    config = copy.deepcopy(DEFAULT_CONFIG)
    if cfg is not None:
        if isinstance(cfg, (str, os.PathLike)):
            path = Path(cfg)
            if not path.is_file():
                raise ValueError(f"cfg: expected the path of an original YAML config file; {str(path)!r} is not a file")
            source = _read_yaml(path)
        elif isinstance(cfg, Mapping):
            source = _to_plain(cfg)
        else:
            raise TypeError(f"cfg: expected a YAML path or a dict in the original config layout; got {type(cfg).__name__}")
        _merge(config, source, "", strict=False)
    for name, value in overrides.items():
        if name not in OVERRIDE_KEYS:
            raise TypeError(f"unexpected keyword argument {name!r}; expected one of {', '.join(sorted(OVERRIDE_KEYS))}")
        node = config
        *parents, leaf = OVERRIDE_KEYS[name]
        for parent in parents:
            node = node[parent]
        node[leaf] = _to_plain(value)
    validate_config(config)
    return config


def _check_int(where: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected an int >= {minimum}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: expected an int >= {minimum}; got {value}")


def _check_float(where: str, value, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: expected a number; got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{where}: expected a number {bound}; got {value}")


def _check_bool(where: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: expected true or false; got {type(value).__name__} {value!r}")


def _check_choice(where: str, value, choices, why: str = "") -> None:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{where}: expected one of {', '.join(choices)}{why}; got {value!r}")


def _check_int_list(where: str, value, minimum: int, allow_empty: bool = False) -> None:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise TypeError(f"{where}: expected a {'' if allow_empty else 'non-empty '}list of ints; got {value!r}")
    for i, item in enumerate(value):
        _check_int(f"{where}[{i}]", item, minimum)


def validate_config(config: Mapping) -> None:
    """Raise ``TypeError``/``ValueError`` naming the key when ``config`` cannot build a network."""
    model, g = config["MODEL"], config["MODEL"]["GSPN"]
    _check_int("MODEL.NUM_CLASSES", model["NUM_CLASSES"], 0)
    _check_float("MODEL.DROP_PATH_RATE", model["DROP_PATH_RATE"], 0.0, 1.0)
    _check_int("DATA.IMG_SIZE", config["DATA"]["IMG_SIZE"])
    _check_bool("TRAIN.USE_CHECKPOINT", config["TRAIN"]["USE_CHECKPOINT"])
    for key in ("PATCH_SIZE", "IN_CHANS", "EMBED_DIM", "D_STATE", "CONV", "ITEMS_EACH_CHUNK"):
        _check_int(f"MODEL.GSPN.{key}", g[key])
    if g["PATCHEMBED"] == "v2":
        _check_int("MODEL.GSPN.PATCH_SIZE // 2 (stride of patch embed v2)", g["PATCH_SIZE"] // 2)
        _check_int("MODEL.GSPN.EMBED_DIM // 2 (width of patch embed v2)", g["EMBED_DIM"] // 2)
    _check_int_list("MODEL.GSPN.DEPTHS", g["DEPTHS"], 0)
    _check_int_list("MODEL.GSPN.FEAT_SIZE", g["FEAT_SIZE"], 1)
    _check_int_list("MODEL.GSPN.SPECIFIC_GLAYERS", g["SPECIFIC_GLAYERS"], 0, allow_empty=True)
    if len(g["FEAT_SIZE"]) < len(g["DEPTHS"]):
        raise ValueError(
            f"MODEL.GSPN.FEAT_SIZE: expected at least one entry per stage ({len(g['DEPTHS'])}); got {g['FEAT_SIZE']}"
        )
    for key in ("RATIO", "MLP_RATIO", "RANK_RATIO"):
        _check_float(f"MODEL.GSPN.{key}", g[key], 0.0)
    if int(g["RATIO"] * g["EMBED_DIM"]) < 1:
        raise ValueError(f"MODEL.GSPN.RATIO: the mixer width int(RATIO * EMBED_DIM) must be >= 1; got {g['RATIO']}")
    if int(g["MLP_RATIO"] * g["EMBED_DIM"]) < 1:
        raise ValueError(f"MODEL.GSPN.MLP_RATIO: the MLP width int(MLP_RATIO * EMBED_DIM) must be >= 1; got {g['MLP_RATIO']}")
    for key in ("DROP_RATE", "MLP_DROP_RATE"):
        _check_float(f"MODEL.GSPN.{key}", g[key], 0.0, 1.0)
    for key in ("CONV_BIAS", "GMLP", "PATCH_NORM", "POSEMBED"):
        _check_bool(f"MODEL.GSPN.{key}", g[key])
    _check_choice("MODEL.GSPN.ACT_LAYER", g["ACT_LAYER"], ACTIVATIONS)
    _check_choice("MODEL.GSPN.MLP_ACT_LAYER", g["MLP_ACT_LAYER"], ACTIVATIONS)
    _check_choice(
        "MODEL.GSPN.NORM_LAYER",
        g["NORM_LAYER"],
        NORM_LAYERS,
        " (the config.py default 'ln' is channel-last, but the original token mixer always treats its input "
        "as channel-first, so the original network cannot run with it; every published yaml uses 'ln2d')",
    )
    _check_choice("MODEL.GSPN.PATCHEMBED", g["PATCHEMBED"], PATCH_EMBEDS)
    _check_choice(
        "MODEL.GSPN.DOWNSAMPLE",
        g["DOWNSAMPLE"],
        DOWNSAMPLES,
        " ('none' cannot run in the original: the stages widen the channels and only a downsampling does that)",
    )
    _check_choice("MODEL.GSPN.FORWARDTYPE", g["FORWARDTYPE"], ("v1",), " (the only forward the original has)")
