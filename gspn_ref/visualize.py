"""Affinity heatmaps of the paper's figure: one output position, each direction and the aggregate.

PNG files are written with the standard library alone (zlib), so no plotting package is needed.
"""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path

import torch

from .layer import GSPN, layer_affinity

# Anchor colours of a perceptually ordered dark-blue -> teal -> yellow map (viridis-like).
_ANCHORS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float64
)


def colorize(values: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` values in ``[0, 1]`` -> ``(H, W, 3)`` uint8 RGB."""
    t = values.clamp(0, 1).double() * (len(_ANCHORS) - 1)
    lo = t.floor().long().clamp(max=len(_ANCHORS) - 2)
    frac = (t - lo).unsqueeze(-1)
    return (_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).round().to(torch.uint8)


def write_png(path, rgb: torch.Tensor, scale: int = 1) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG, each pixel repeated ``scale`` times per axis."""
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1).contiguous()
    H, W, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].numpy().tobytes() for i in range(H))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return path


def synthetic_image(size: int = 32) -> torch.Tensor:
    """A ``(1, 3, size, size)`` image-like pattern: a disc, a diagonal bar and a soft gradient."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x + 0.3) ** 2 + (y + 0.2) ** 2 < 0.25).float()
    bar = ((x - y).abs() < 0.15).float()
    return torch.stack([disc, bar, 0.5 * (x + 1)]).unsqueeze(0)


def log_normalize(row: torch.Tensor, decades: float = 4.0) -> torch.Tensor:
    """``|row|`` on a log scale spanning ``decades`` below its maximum, mapped to ``[0, 1]``."""
    mag = row.abs()
    peak = mag.max().clamp_min(1e-300)
    return ((mag / peak).clamp_min(10.0 ** -decades).log10() + decades) / decades


def affinity_heatmaps(layer: GSPN, image: torch.Tensor, position: tuple[int, int], out_dir, channel: int = 0,
                      scale: int = 8) -> dict[str, Path]:
    """Write one PNG per direction plus ``aggregated.png`` and ``panel.png`` (all side by side).

    ``image``: ``(1, layer.dim, H, W)``; ``position``: the output ``(row, col)`` whose affinity row
    is drawn. Returns ``{name: path}``. ``layer`` itself is left as it was (dtype, parameters,
    training mode): the float64 evaluation runs on a copy.
    """
    _, H, W = image.shape[1:]
    i, j = position
    if not (0 <= i < H and 0 <= j < W):
        raise ValueError(f"position: expected (row, col) inside ({H}, {W}); got {position}")
    layer = copy.deepcopy(layer).double().eval()  # the caller's module keeps its dtype and mode
    total, maps = layer_affinity(layer, image.double(), channel, per_direction=True)
    n = i * W + j
    panels = {d: maps[k][0, n].reshape(H, W) for k, d in enumerate(layer.directions)}
    panels["aggregated"] = total[0, n].reshape(H, W)
    out = Path(out_dir)
    written = {}
    tiles = []
    for name, values in panels.items():
        rgb = colorize(log_normalize(values))
        rgb[i, j] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # mark the output position
        written[name] = write_png(out / f"affinity_{name}.png", rgb, scale)
        tiles.append(rgb)
        tiles.append(torch.full((H, 1, 3), 255, dtype=torch.uint8))
    written["panel"] = write_png(out / "affinity_panel.png", torch.cat(tiles[:-1], dim=1), scale)
    return written
