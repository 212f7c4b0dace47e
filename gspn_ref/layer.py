"""The GSPN layer (docs/operator.md ("The project's layer")), a transformer-style block around it, and a tiny classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .affinity import affinity_matrix
from .directions import DIRECTIONS
from .normalize import normalize_weights
from .ops import gspn_fused_scan, gspn_scan
from .validation import validate_chunk, validate_direction, validate_feature_map


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class GRN(nn.Module):
    """Global response normalization (ConvNeXt V2) on NCHW: ``x + gamma * x * N(x) + beta``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
        nx = gx / (gx.mean(dim=1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int; got {value}")
    return value


class GSPN(nn.Module):
    """Generalized spatial propagation layer: ``(B, dim, H, W) -> (B, dim, H, W)``.

    ``d_inner`` (default ``2*dim``) channels are propagated in each of ``directions``; the weights,
    input gate, output gate and skip of every direction are predicted from a ``d_proxy``-channel proxy;
    ``groups`` (default ``d_inner``) weight groups are shared by ``d_inner // groups`` channels each.
    ``fused=True`` runs each direction as one ``gspn::fused_scan`` (logits, gate and skip in, one
    pass over memory); ``fused=False`` normalizes, scans and gates with separate ops (same
    parameters, same result up to rounding: the fused op rounds once, at the end).
    """

    def __init__(
        self,
        dim: int,
        *,
        d_inner: int | None = None,
        d_proxy: int = 16,
        directions: Sequence[str] = DIRECTIONS,
        chunk: int = 0,
        groups: int | None = None,
        fused: bool = True,
    ):
        super().__init__()
        if not isinstance(fused, bool):
            raise TypeError(f"fused: expected a bool; got {type(fused).__name__} {fused!r}")
        self.fused = fused
        dim = _positive_int("dim", dim)
        d_inner = _positive_int("d_inner", 2 * dim if d_inner is None else d_inner)
        d_proxy = _positive_int("d_proxy", d_proxy)
        groups = _positive_int("groups", d_inner if groups is None else groups)
        if d_inner % groups:
            raise ValueError(f"groups: expected a divisor of d_inner = {d_inner}; got {groups}")
        if isinstance(directions, str) or len(directions) == 0:
            raise ValueError(f"directions: expected a non-empty sequence of {DIRECTIONS}; got {directions!r}")
        self.directions = tuple(validate_direction(d) for d in directions)
        self.chunk = validate_chunk(chunk)
        self.dim, self.d_inner, self.d_proxy, self.groups = dim, d_inner, d_proxy, groups
        self._split = [groups] * 3 + [d_inner] * 3  # al, am, ar, lam, gate, skip

        self.in_proj = nn.Conv2d(dim, d_inner, 1, bias=False)
        self.dwconv = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        self.proxy = nn.Conv2d(d_inner, d_proxy, 1, bias=False)
        self.param_proj = nn.Conv2d(d_proxy, len(self.directions) * sum(self._split), 1, bias=False)
        self.alpha = nn.Parameter(torch.full((len(self.directions),), 1.0 / len(self.directions)))
        self.norm = LayerNorm2d(d_inner)
        self.grn = GRN(d_inner)
        self.out_proj = nn.Conv2d(d_inner, dim, 1, bias=False)

    def _raw_propagation_inputs(self, x: torch.Tensor):
        """``u`` and, per direction, ``(al, am, ar, lam, gate, skip)`` (weight logits, not normalized)."""
        validate_feature_map(x, self.dim, self.in_proj.weight)
        u = self.dwconv(self.in_proj(x))
        params = self.param_proj(self.proxy(u)).split(sum(self._split), dim=1)
        return u, [p.split(self._split, dim=1) for p in params]

    def propagation_inputs(self, x: torch.Tensor):
        """Return ``u`` (the propagated features) and, per direction, ``(lam, gl, gm, gr, gate, skip)``."""
        u, raw = self._raw_propagation_inputs(x)
        per_direction = []
        for direction, (al, am, ar, lam, gate, skip) in zip(self.directions, raw):
            gl, gm, gr = normalize_weights(al, am, ar, direction)
            per_direction.append((lam, gl, gm, gr, gate, skip))
        return u, per_direction

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """``y = sum_k alpha_k * (scan_k(u) * gate_k + u * skip_k)``: ``(B, d_inner, H, W)``."""
        u, raw = self._raw_propagation_inputs(x)
        y = None
        for k, (direction, (al, am, ar, lam, gate, skip)) in enumerate(zip(self.directions, raw)):
            if self.fused:
                y_k = gspn_fused_scan(u, lam, al, am, ar, gate, skip, direction, self.chunk)
            else:
                gl, gm, gr = normalize_weights(al, am, ar, direction)
                y_k = gspn_scan(u, lam, gl, gm, gr, direction, self.chunk) * gate + u * skip
            y = self.alpha[k] * y_k if y is None else y + self.alpha[k] * y_k
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.grn(self.norm(self.aggregate(x))))


@torch.no_grad()
def layer_affinity(layer: GSPN, x: torch.Tensor, channel: int, per_direction: bool = False):
    """Aggregated affinity of ``layer`` for one inner channel at input ``x``: ``(B, H*W, H*W)`` float64.

    Row ``n`` holds the weight of every position of ``u`` (the propagated features) in the
    aggregated output ``y = layer.aggregate(x)`` at position ``n``: ``sum_k alpha_k * (gate_k * A_k + diag(skip_k))``.
    With ``per_direction=True`` also returns the list of ``A_k`` for that channel.
    """
    if not 0 <= channel < layer.d_inner:
        raise ValueError(f"channel: expected 0 <= channel < d_inner = {layer.d_inner}; got {channel}")
    _, per_direction_inputs = layer.propagation_inputs(x)
    c, g = channel, channel // (layer.d_inner // layer.groups)
    total, maps = None, []
    for k, (direction, (lam, gl, gm, gr, gate, skip)) in enumerate(zip(layer.directions, per_direction_inputs)):
        A = affinity_matrix(lam[:, c : c + 1], gl[:, g : g + 1], gm[:, g : g + 1], gr[:, g : g + 1], direction, layer.chunk)
        A = A[:, 0]
        maps.append(A)
        gate_c = gate[:, c].flatten(1).to(torch.float64)
        skip_c = skip[:, c].flatten(1).to(torch.float64)
        term = float(layer.alpha[k]) * (gate_c.unsqueeze(-1) * A + torch.diag_embed(skip_c))
        total = term if total is None else total + term
    return (total, maps) if per_direction else total


class GSPNBlock(nn.Module):
    """``x + GSPN(norm(x))`` then ``x + MLP(norm(x))``; shape-preserving on ``(B, dim, H, W)``."""

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0, **gspn_kwargs):
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm1 = LayerNorm2d(dim)
        self.gspn = GSPN(dim, **gspn_kwargs)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gspn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGSPNClassifier(nn.Module):
    """Small image classifier: 4x4 patch embedding, GSPN stages with 2x downsampling, linear head.

    Input ``(B, in_chans, H, W)`` with ``H`` and ``W`` multiples of ``4 * 2**(len(dims) - 1)``;
    output logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 10,
        dims: Sequence[int] = (32, 64),
        depths: Sequence[int] = (1, 1),
        d_proxy: int = 8,
        chunk: int = 0,
    ):
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims, depths: expected sequences of equal non-zero length; got {dims!r}, {depths!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers = [] if i == 0 else [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            layers += [GSPNBlock(dim, d_proxy=d_proxy, chunk=chunk) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))
