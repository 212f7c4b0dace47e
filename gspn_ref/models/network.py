"""The paper's classification networks (GSPN-T/S/B), weight-compatible with the original code.

This is a re-implementation of the ``VSSM`` network of NVlabs/GSPN (``classification/models``) from
its description in ``conformance/OFFICIAL_MODEL.md``: same modules, same state-dict keys and shapes,
same numbers, quirks included. Its token mixer (:class:`GSPNMixer`) differs from the project's own
:class:`gspn_ref.GSPN` layer; ``docs/models.md`` lists the differences.

Every map is ``(B, C, N, N)`` (channel-first, square). The mixer runs its four scan directions as ONE
call of the project's operator ``torch.ops.gspn.fused_scan`` (per-channel weights) on the four
transformed copies of its input stacked along channels, as the original does; so an exported graph has
one scan node per mixer and every backend kernel of the operator serves it. The original scans its
frames left to right, column by column; the mixer computes the same numbers with every map transposed
and scans top to bottom (see :meth:`GSPNMixer.forward`): rows are contiguous in memory, columns are not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layer import GRN, LayerNorm2d
from ..ops import gspn_fused_scan

N_DIRECTIONS = 4  # the original hard-codes four scan frames (and 3 x 4 weight maps)
ORIGINAL_SCAN_DIRECTION = "l2r"  # the original scans every frame left to right, column by column
SCAN_DIRECTION = "t2b"  # the mixer scans the transposed frames top to bottom: the same numbers


def _require_square(x: torch.Tensor, where: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{where}: expected a 4-D tensor (B, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[-2] != x.shape[-1]:
        raise ValueError(
            f"{where}: expected a square map (H == W); got {x.shape[-2]} x {x.shape[-1]}. The GSPN token mixer "
            "stacks every feature map with its transpose (the original network has the same restriction), "
            "so only square inputs can be used; resize or pad the image to a square"
        )


def _activation(name: str) -> nn.Module:
    return {"elu": nn.ELU, "silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}[name.lower()]()


def _norm(kind: str, channels: int) -> nn.Module:
    """The configurable norm of blocks, embeddings, downsamplings and head (channel-first)."""
    return LayerNorm2d(channels) if kind == "ln2d" else nn.BatchNorm2d(channels)


class Linear2d(nn.Linear):
    """A per-pixel linear map on ``(B, in, H, W)``, stored like ``nn.Linear`` (2-D ``(out, in)`` weight).

    Loading accepts the 4-D ``(out, in, 1, 1)`` weight of a 1x1 convolution too, as the original does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2:] == (1, 1):
            state_dict[key] = value.reshape(value.shape[:2])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability ``p``
    (survivors scaled by ``1 / (1 - p)``); the identity in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * (mask.div_(keep) if keep > 0 else mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def normalize_propagation_weights(gl: torch.Tensor, gm: torch.Tensor, gr: torch.Tensor):
    """The original's weight normalization over the rows ``h`` (dim 2) of ``(B, K, N, W)`` logits.

    ``s = sigmoid(logit)``; divide by ``s_l + s_m + s_r``, except ``s_m + s_r`` on row 0 and
    ``s_l + s_m`` on row ``N-1`` (the last-row rule wins when ``N == 1``), clamped below at 1e-7.
    Unlike :func:`gspn_ref.normalize_weights` it leaves ``gl`` non-zero on row 0 and ``gr`` on row
    ``N-1``; the scan multiplies them by a neighbour outside the line (zero), so outputs agree.
    """
    sl, sm, sr = torch.sigmoid(gl), torch.sigmoid(gm), torch.sigmoid(gr)
    rows = torch.arange(sl.shape[2], device=sl.device).view(-1, 1)
    den = torch.where(rows == sl.shape[2] - 1, sl + sm, torch.where(rows == 0, sm + sr, sl + sm + sr))
    den = den.clamp(min=1e-7)
    return sl / den, sm / den, sr / den


def scan_frames(u: torch.Tensor) -> torch.Tensor:
    """``(B, D, N, N) -> (B, 4*D, N, N)``: the four frames ``u, u^T, flip_w(u), flip_w(u^T)``,
    direction-major (channel ``k*D + c`` is channel ``c`` of frame ``k``)."""
    pair = torch.stack([u, u.transpose(2, 3)], dim=1)
    return torch.cat([pair, pair.flip(-1)], dim=1).flatten(1, 2)


def transposed_scan_frames(u: torch.Tensor) -> torch.Tensor:
    """``scan_frames(u).transpose(2, 3)`` made directly: the frames ``u^T, u, flip_h(u^T), flip_h(u)``
    (``flip_w`` of a map is ``flip_h`` of its transpose)."""
    pair = torch.stack([u.transpose(2, 3), u], dim=1)
    return torch.cat([pair, pair.flip(-2)], dim=1).flatten(1, 2)


class GSPNMixer(nn.Module):
    """The original token mixer (``layers.i.blocks.j.op``): ``(B, dim, N, N) -> (B, dim, N, N)``.

    ``u = conv2d(in_proj(x))`` (``d_inner = int(ratio * dim)`` channels, depthwise ``d_conv`` kernel,
    no activation); a ``d_state``-channel proxy predicts, per direction, the three propagation
    weights, the input gate ``lam``, the output gate and the skip. The four frames of ``u`` are
    scanned left to right in ONE ``gspn.fused_scan`` call with chunk ``items_each_chunk``; the
    per-frame results ``h * gate + frame * skip`` are mixed by ``m_conv`` in their scan frames (not
    mapped back), then ``out_proj(grn(out_norm(.)))``. The predicted maps are not transformed with
    ``u``. :meth:`forward` computes this with every map transposed (a top-to-bottom scan).
    """

    def __init__(
        self,
        dim: int,
        *,
        items_each_chunk: int,
        ratio: float = 2.0,
        d_state: int = 16,
        d_conv: int = 3,
        conv_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        d_inner = int(ratio * dim)
        self.dim, self.d_inner, self.d_state, self.items_each_chunk = dim, d_inner, d_state, items_each_chunk
        self.in_proj = Linear2d(dim, d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias
        )
        self.x_conv_down = nn.Conv2d(d_inner, d_state, 1, bias=False)
        self.w_conv_up = nn.Conv2d(d_state, 3 * N_DIRECTIONS * d_inner, 1, bias=False)
        self.l_conv_up = nn.Conv2d(d_state, N_DIRECTIONS * d_inner, 1, bias=False)
        self.u_conv_up = nn.Conv2d(d_state, N_DIRECTIONS * d_inner, 1, bias=False)
        self.d_conv = nn.Conv2d(d_state, N_DIRECTIONS * d_inner, 1, bias=False)
        self.m_conv = nn.Conv2d(N_DIRECTIONS, 1, 1, bias=False)
        self.grn = GRN(d_inner)
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = Linear2d(d_inner, dim, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def raw_scan_inputs(self, x: torch.Tensor, transposed: bool = False):
        """``(frames, lam, al, am, ar, gate, skip)``, each ``(B, 4*d_inner, N, N)``, direction-major;
        ``al, am, ar`` are the weight logits (before the normalization). In the original's frames
        (scanned ``l2r``), or ``transposed`` (each map's transpose, scanned ``t2b``)."""
        _require_square(x, "x")
        u = self.conv2d(self.in_proj(x))
        proxy = self.x_conv_down(u)
        if transposed:  # the 1x1 projections commute with the transpose: transpose their 8-16 inputs
            proxy = proxy.transpose(2, 3)
        al, am, ar = self.w_conv_up(proxy).chunk(3, dim=1)
        frames = transposed_scan_frames(u) if transposed else scan_frames(u)
        return frames, self.l_conv_up(proxy), al, am, ar, self.u_conv_up(proxy), self.d_conv(proxy)

    def scan_inputs(self, x: torch.Tensor):
        """``(frames, lam, gl, gm, gr, gate, skip)`` of the original's frames, each
        ``(B, 4*d_inner, N, N)``, direction-major, normalized by the original's rule."""
        frames, lam, al, am, ar, gate, skip = self.raw_scan_inputs(x)
        gl, gm, gr = normalize_propagation_weights(al, am, ar)
        return frames, lam, gl, gm, gr, gate, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # chunk = items_each_chunk whatever N is: for N <= chunk that is global propagation, and the
        # exported graph stays right at every input size.
        # The original's normalization equals docs/operator.md's wherever it matters: its extra gl on
        # row 0 and gr on row N-1 multiply neighbours outside the line, and its N == 1 rule (quirk
        # 12) changes weights that a single-line scan never reads. So: one fused scan.
        # Transposed: an l2r scan of a map is the t2b scan of its transpose, and everything after
        # the scan (m_conv, LayerNorm, GRN, out_proj) is per pixel or (GRN) a sum over the whole
        # map, so the mixer runs on the transposed maps and transposes its dim-channel output
        # back. Same numbers; the scan walks contiguous rows instead of strided columns (GSPN-T,
        # batch 1, 2-core EPYC: ONNX Runtime 139 -> 120 ms, torch with the TVM kernels ~15%
        # faster; the 4 * d_inner-channel scan inputs cost the same to build either way).
        frames, lam, al, am, ar, gate, skip = self.raw_scan_inputs(x, transposed=True)
        y = gspn_fused_scan(frames, lam, al, am, ar, gate, skip, SCAN_DIRECTION, self.items_each_chunk)
        B, _, H, W = y.shape
        y = self.m_conv(y.reshape(B, N_DIRECTIONS, self.d_inner * H, W)).reshape(B, self.d_inner, H, W)
        return self.dropout(self.out_proj(self.grn(self.out_norm(y))).transpose(2, 3))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_inner={self.d_inner}, d_state={self.d_state}, items_each_chunk={self.items_each_chunk}"


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` with per-pixel linears: ``(B, dim, H, W) -> (B, dim, H, W)``."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = _activation(act)
        self.fc2 = Linear2d(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class GatedMlp(nn.Module):
    """``fc2(a * act(b))`` with ``(a, b) = fc1(x)`` split along channels (``MODEL.GSPN.GMLP``)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear2d(dim, 2 * hidden)
        self.act = _activation(act)
        self.fc2 = Linear2d(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=1)
        return self.drop(self.fc2(a * self.act(b)))


class MixerBlock(nn.Module):
    """Pre-norm residual block: ``x + op(norm(x))``, then ``x + mlp(norm2(x))`` (with stochastic depth)."""

    def __init__(
        self,
        dim: int,
        *,
        norm_layer: str,
        drop_path: float,
        mixer: Mapping[str, Any],
        mlp_ratio: float,
        mlp_act: str,
        mlp_drop: float,
        gated_mlp: bool,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm = _norm(norm_layer, dim)
        self.op = GSPNMixer(dim, **mixer)
        self.drop_path = DropPath(drop_path)
        self.norm2 = _norm(norm_layer, dim)
        self.mlp = (GatedMlp if gated_mlp else Mlp)(dim, int(dim * mlp_ratio), mlp_act, mlp_drop)

    @property
    def items_each_chunk(self) -> int:
        return self.op.items_each_chunk

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class PatchEmbedV1(nn.Sequential):
    """``patch x patch`` conv with stride ``patch`` then a norm: ``(B, in, H, W) -> (B, dim, H/p, W/p)``.

    Slots 0 (conv) and 2 (norm) carry the original's state-dict indices.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm_layer: str, patch_norm: bool = True):
        super().__init__(
            nn.Conv2d(in_chans, dim, patch_size, stride=patch_size),
            nn.Identity(),
            _norm(norm_layer, dim) if patch_norm else nn.Identity(),
        )


class PatchEmbedV2(nn.Sequential):
    """Two overlapping stride-``patch/2`` convs (kernel ``patch/2 + 1``, padding 1), each followed by a
    norm, exact GELU between: a side ``n`` becomes ``ceil(n / 2)`` twice for ``patch = 4``.

    Slots 0, 2, 5, 7 (conv, norm, conv, norm) carry the original's state-dict indices.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm_layer: str, patch_norm: bool = True):
        stride = patch_size // 2
        half = dim // 2
        super().__init__(
            nn.Conv2d(in_chans, half, stride + 1, stride=stride, padding=1),
            nn.Identity(),
            _norm(norm_layer, half) if patch_norm else nn.Identity(),
            nn.Identity(),
            nn.GELU(),
            nn.Conv2d(half, dim, stride + 1, stride=stride, padding=1),
            nn.Identity(),
            _norm(norm_layer, dim) if patch_norm else nn.Identity(),
        )


class DownsampleV1(nn.Module):
    """Patch merging: 2x2 space-to-channel, norm over ``4*dim``, linear ``4*dim -> out_dim`` (no bias).

    Channel blocks in the order (even row, even col), (odd row, even col), (even row, odd col),
    (odd row, odd col). Odd sides are refused: the original fails on them (quirk 13).
    """

    def __init__(self, dim: int, out_dim: int, norm_layer: str):
        super().__init__()
        self.reduction = Linear2d(4 * dim, out_dim, bias=False)
        self.norm = _norm(norm_layer, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(
                f"x: downsampling v1 needs an even side; got {x.shape[-2]} x {x.shape[-1]} (the original pads the "
                "wrong axes for odd sides and fails); use an input size that stays even, or DOWNSAMPLE v2/v3"
            )
        merged = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return self.reduction(self.norm(merged))


class DownsampleV2(nn.Sequential):
    """2x2 conv, stride 2, then a norm: side ``n -> floor(n/2)``. Slots 1, 3 carry the original's indices."""

    def __init__(self, dim: int, out_dim: int, norm_layer: str):
        super().__init__(nn.Identity(), nn.Conv2d(dim, out_dim, 2, stride=2), nn.Identity(), _norm(norm_layer, out_dim))


class DownsampleV3(nn.Sequential):
    """3x3 conv, stride 2, padding 1, then a norm: side ``n -> ceil(n/2)``. Slots 1, 3 carry the indices."""

    def __init__(self, dim: int, out_dim: int, norm_layer: str):
        super().__init__(
            nn.Identity(), nn.Conv2d(dim, out_dim, 3, stride=2, padding=1), nn.Identity(), _norm(norm_layer, out_dim)
        )


_DOWNSAMPLES = {"v1": DownsampleV1, "v2": DownsampleV2, "v3": DownsampleV3}
_PATCH_EMBEDS = {"v1": PatchEmbedV1, "v2": PatchEmbedV2}


class Stage(nn.Module):
    """``blocks`` (an ``nn.Sequential`` of :class:`MixerBlock`) then ``downsample`` (identity for the last)."""

    def __init__(self, blocks: Sequence[MixerBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class ClassifierHead(nn.Module):
    """``head(mean_hw(norm(x)))``: ``(B, C, H, W) -> (B, num_classes)``."""

    def __init__(self, dim: int, num_classes: int, norm_layer: str):
        super().__init__()
        self.norm = _norm(norm_layer, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.norm(x), 1).flatten(1)
        return pooled if pre_logits else self.head(pooled)


def is_global_block(stage: int, block: int, global_stages: Sequence[int]) -> bool:
    """The original's rule: in a listed stage, blocks ``j < 7`` and every ``j`` with ``(j+1) % 7 == 0``."""
    return stage in global_stages and (block < 7 or (block + 1) % 7 == 0)


class GSPNNet(nn.Module):
    """The original GSPN classification network (``VSSM``): ``(B, in_chans, N, N) -> (B, num_classes)``.

    Build it with :func:`gspn_ref.models.from_official_config` or ``gspn_tiny()`` / ``gspn_small()`` /
    ``gspn_base()``; ``config`` is the full config tree of :func:`gspn_ref.models.official_config`
    (kept as ``self.config``). State-dict keys: ``[pos_embed], patch_embed.*, layers.{i}.blocks.{j}.*,
    layers.{i}.downsample.*, classifier.norm.*, classifier.head.*``. Inputs must be square.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        from .config import official_config  # validates, and fills defaults into a partial tree

        config = official_config(config)
        g = config["MODEL"]["GSPN"]
        self.config = config
        depths = list(g["DEPTHS"])
        self.num_classes = config["MODEL"]["NUM_CLASSES"]
        self.dims = [int(g["EMBED_DIM"] * 2**i) for i in range(len(depths))]
        self.num_features = self.dims[-1]
        norm_layer = g["NORM_LAYER"].lower()
        rates = torch.linspace(0, config["MODEL"]["DROP_PATH_RATE"], sum(depths), device="cpu").tolist()

        self.img_size = config["DATA"]["IMG_SIZE"]
        if g["POSEMBED"]:
            side = self.img_size // g["PATCH_SIZE"]
            self.pos_embed = nn.Parameter(torch.zeros(1, self.dims[0], side, side))
        else:
            self.pos_embed = None
        self.patch_embed = _PATCH_EMBEDS[g["PATCHEMBED"].lower()](
            g["IN_CHANS"], self.dims[0], g["PATCH_SIZE"], norm_layer, g["PATCH_NORM"]
        )
        layers = []
        for i, depth in enumerate(depths):
            blocks = []
            for j in range(depth):
                chunk = g["FEAT_SIZE"][i] if is_global_block(i, j, g["SPECIFIC_GLAYERS"]) else g["ITEMS_EACH_CHUNK"]
                mixer = dict(
                    items_each_chunk=chunk,
                    ratio=g["RATIO"],
                    d_state=g["D_STATE"],
                    d_conv=g["CONV"],
                    conv_bias=g["CONV_BIAS"],
                    dropout=g["DROP_RATE"],
                )
                blocks.append(
                    MixerBlock(
                        self.dims[i],
                        norm_layer=norm_layer,
                        drop_path=rates[sum(depths[:i]) + j],
                        mixer=mixer,
                        mlp_ratio=g["MLP_RATIO"],
                        mlp_act=g["MLP_ACT_LAYER"],
                        mlp_drop=g["MLP_DROP_RATE"],
                        gated_mlp=g["GMLP"],
                        use_checkpoint=config["TRAIN"]["USE_CHECKPOINT"],
                    )
                )
            last = i == len(depths) - 1
            downsample = None if last else _DOWNSAMPLES[g["DOWNSAMPLE"].lower()](self.dims[i], self.dims[i + 1], norm_layer)
            layers.append(Stage(blocks, downsample))
        self.layers = nn.ModuleList(layers)
        self.classifier = ClassifierHead(self.num_features, self.num_classes, norm_layer)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialization: linears truncated-normal (std 0.02, zero bias), LayerNorms (1, 0),
        ``pos_embed`` truncated-normal; convolutions keep PyTorch's default, GRN starts at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def block_chunks(self) -> list[dict[str, Any]]:
        """Every block's name and chunk ``K`` (``items_each_chunk``), in the archs-file layout."""
        return [
            {"block": f"layers.{i}.blocks.{j}", "items_each_chunk": block.items_each_chunk}
            for i, stage in enumerate(self.layers)
            for j, block in enumerate(stage.blocks)
        ]

    def no_weight_decay(self) -> set[str]:
        """Parameter names the original excludes from weight decay."""
        return {"pos_embed"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, N, N) -> (B, num_features, n, n)``: the map before the classifier."""
        _require_square(x, "x")
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            if x.shape[-2:] != self.pos_embed.shape[-2:]:
                raise ValueError(
                    f"x: this network has a position embedding for {self.img_size} x {self.img_size} inputs "
                    f"(DATA.IMG_SIZE); the patch embedding gave a {x.shape[-2]} x {x.shape[-1]} map"
                )
            x = x + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        upgrade_legacy_keys(state_dict, prefix, self)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


_LEGACY_RENAMES = (
    ("patch_embed.proj", "patch_embed.0"),
    ("patch_embed.norm", "patch_embed.2"),
    ("norm", "classifier.norm"),
    ("head", "classifier.head"),
)


def upgrade_legacy_keys(state_dict: dict, prefix: str = "", model: GSPNNet | None = None) -> None:
    """Rename, in place, the older key names the original loader accepts, and resize ``pos_embed``.

    ``patch_embed.proj -> patch_embed.0``, ``patch_embed.norm -> patch_embed.2``,
    ``layers.i.blocks.j.ln_1 -> .norm``, ``.self_attention -> .op``, ``norm -> classifier.norm``,
    ``head -> classifier.head`` (each a prefix of the key, as the original matches them); a
    ``pos_embed`` of another size is resized bicubically to ``model``'s.
    """
    import re

    def rename(old: str, new: str) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)

    pos_key = prefix + "pos_embed"
    if model is not None and model.pos_embed is not None and isinstance(state_dict.get(pos_key), torch.Tensor):
        source = state_dict[pos_key]
        if source.dim() == 4 and source.shape[2:] != model.pos_embed.shape[2:]:
            resized = F.interpolate(source.float(), size=tuple(model.pos_embed.shape[2:]), mode="bicubic", align_corners=False)
            state_dict[pos_key] = resized.to(source.dtype)
    for old, new in _LEGACY_RENAMES[:2]:
        rename(old, new)
    block = re.compile(re.escape(prefix) + r"(layers\.\d+\.blocks\.\d+\.)(ln_1|self_attention)")
    for key in list(state_dict):
        match = block.match(key)
        if match:
            new = {"ln_1": "norm", "self_attention": "op"}[match.group(2)]
            state_dict[prefix + match.group(1) + new + key[match.end() :]] = state_dict.pop(key)
    for old, new in _LEGACY_RENAMES[2:]:
        rename(old, new)
