"""Weight normalization, the GSPN layer, its aggregated affinity, the block and the classifier."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_scaled, naive_scan_float64
from hypothesis import given
from hypothesis import strategies as st

from gspn_ref import (
    DIRECTIONS,
    GSPN,
    GSPNBlock,
    TinyGSPNClassifier,
    is_column,
    layer_affinity,
    normalize_weights,
)


@given(
    direction=st.sampled_from(DIRECTIONS),
    H=st.integers(1, 7),
    W=st.integers(1, 7),
    scale=st.floats(0.1, 30),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
)
def test_normalized_weights_are_row_stochastic(direction, H, W, scale, dtype):
    logits = (torch.randn(3, 2, 3, H, W, generator=torch.Generator().manual_seed(H * 7 + W)) * scale).to(dtype)
    gl, gm, gr = normalize_weights(*logits, direction)
    assert gl.dtype == dtype and gl.shape == logits[0].shape
    assert (gl >= 0).all() and (gm >= 0).all() and (gr >= 0).all()
    total = gl.double() + gm.double() + gr.double()
    tol = 4 * torch.finfo(dtype).eps
    assert (total <= 1 + tol).all()
    # Rows sum to 1 wherever the sigmoids are not all below the 1e-7 floor of the division.
    first = (slice(None), slice(None), 0) if is_column(direction) else (Ellipsis, 0)
    last = (slice(None), slice(None), -1) if is_column(direction) else (Ellipsis, -1)
    s_l, s_m, s_r = torch.sigmoid(logits.to(torch.float64))
    s_l[first], s_r[last] = 0, 0
    above_floor = s_l + s_m + s_r >= 2e-7
    assert ((total - 1).abs()[above_floor] <= tol).all()
    assert (gl[first] == 0).all() and (gr[last] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_lines_of_one_position_propagate_with_gm_one(direction, dtype):
    """SPEC section 3: for P = 1 (no neighbour on either side), gm = 1 and gl = gr = 0."""
    shape = (2, 3, 5, 1) if not is_column(direction) else (2, 3, 1, 5)  # one position per line
    logits = (torch.randn(3, *shape, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    gl, gm, gr = normalize_weights(*logits, direction)
    assert (gm == 1).all() and (gl == 0).all() and (gr == 0).all()


def test_normalize_weights_rejects_bad_arguments():
    a = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="direction"):
        normalize_weights(a, a, a, "diagonal")
    with pytest.raises(ValueError, match=r"am: expected shape \(1, 1, 2, 2\)"):
        normalize_weights(a, torch.zeros(1, 1, 2, 3), a, "t2b")
    with pytest.raises(TypeError, match="ar: expected a floating-point"):
        normalize_weights(a, a, torch.zeros(1, 1, 2, 2, dtype=torch.int64), "t2b")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial parameters everywhere (GRN starts as the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"chunk": 2}, {"groups": 2}, {"directions": ("l2r",)}, {"d_inner": 6, "d_proxy": 3, "directions": ("b2t", "r2l")}],
)
def test_gspn_layer_shapes_and_gradients(kwargs):
    layer = randomize_(GSPN(4, **kwargs))
    x = torch.randn(2, 4, 5, 7, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


def expected_support(direction, H, W, chunk):
    """``(H*W, H*W)`` bool: which inputs reach which outputs in one direction, from SPEC section 2 alone.

    Input ``m`` reaches output ``n`` iff ``n``'s line is scanned at or after ``m``'s, in the same
    chunk segment, and ``|p(n) - p(m)|`` is at most the number of lines between them (each line
    moves a value by at most one position). Weights are positive, so nothing cancels.
    """
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    column = direction in ("l2r", "r2l")
    line, pos = (j.flatten(), i.flatten()) if column else (i.flatten(), j.flatten())
    n_lines = W if column else H
    s = n_lines - 1 - line if direction in ("b2t", "r2l") else line
    segment = s // chunk if chunk else torch.zeros_like(s)
    lines_between = s[:, None] - s[None, :]
    same_segment = segment[:, None] == segment[None, :]
    return (lines_between >= 0) & same_segment & ((pos[:, None] - pos[None, :]).abs() <= lines_between)


@pytest.mark.parametrize("chunk, groups", [(0, None), (2, 3)])
def test_layer_affinity_reproduces_aggregation(chunk, groups):
    """SPEC section 6: y[c] == (sum_k alpha_k (gate_k A_k + diag skip_k)) u[c]; each A_k is one-sided
    (block lower-triangular), their sum connects every pair that some direction connects."""
    layer = randomize_(GSPN(3, d_proxy=4, chunk=chunk, groups=groups), seed=3).double()
    H, W = 4, 5
    x = torch.randn(1, 3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = layer.aggregate(x)
        u, _ = layer.propagation_inputs(x)
    supports = [expected_support(d, H, W, chunk) for d in layer.directions]
    aggregate_support = torch.stack(supports).any(0) | torch.eye(H * W, dtype=torch.bool)
    for channel in (0, layer.d_inner - 1):
        affinity, maps = layer_affinity(layer, x, channel, per_direction=True)
        assert affinity.shape == (1, 20, 20) and len(maps) == 4
        torch.testing.assert_close(affinity @ u[:, channel].flatten(1)[..., None], y[:, channel].flatten(1)[..., None])
        for direction, A, support in zip(layer.directions, maps, supports):
            assert torch.equal(A[0].abs() > 1e-12, support), f"{direction}: connections differ from SPEC section 2"
        assert torch.equal(affinity[0].abs() > 1e-12, aggregate_support)
    with pytest.raises(ValueError, match="channel"):
        layer_affinity(layer, x, layer.d_inner)


def layer_from_spec(layer: GSPN, x: torch.Tensor) -> torch.Tensor:
    """SPEC section 6 evaluated in float64 from ``layer``'s parameters: ``(B, dim, H, W)``.

    Shares no code with ``gspn_ref``: weight normalization from SPEC section 3, the scan from
    ``naive_scan_float64``, layer norm and GRN written out.
    """
    p = {name: t.detach().double() for name, t in layer.named_parameters()}
    x = x.double()
    u = F.conv2d(F.conv2d(x, p["in_proj.weight"]), p["dwconv.weight"], p["dwconv.bias"], padding=1, groups=layer.d_inner)
    z = F.conv2d(u, p["proxy.weight"])
    G, D = layer.groups, layer.d_inner
    per_direction = F.conv2d(z, p["param_proj.weight"]).split(3 * G + 3 * D, dim=1)
    y = torch.zeros_like(u)
    for k, direction in enumerate(layer.directions):
        al, am, ar, lam, gate, skip = per_direction[k].split([G, G, G, D, D, D], dim=1)
        s_l, s_m, s_r = torch.sigmoid(al), torch.sigmoid(am), torch.sigmoid(ar)
        if direction in ("l2r", "r2l"):  # positions along a line are rows
            s_l[:, :, 0, :], s_r[:, :, -1, :] = 0, 0
        else:
            s_l[:, :, :, 0], s_r[:, :, :, -1] = 0, 0
        total = (s_l + s_m + s_r).clamp_min(1e-7)
        h = naive_scan_float64(u, lam, s_l / total, s_m / total, s_r / total, direction, layer.chunk)
        y = y + p["alpha"][k] * (h * gate + u * skip)
    mean = y.mean(dim=1, keepdim=True)
    var = (y - mean).square().mean(dim=1, keepdim=True)
    normed = (y - mean) / torch.sqrt(var + layer.norm.eps) * p["norm.weight"].view(1, -1, 1, 1) + p["norm.bias"].view(1, -1, 1, 1)
    gx = normed.square().sum(dim=(2, 3), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=1, keepdim=True) + layer.grn.eps)
    grn = p["grn.gamma"] * normed * nx + p["grn.beta"] + normed
    return F.conv2d(grn, p["out_proj.weight"])


@pytest.mark.parametrize(
    "kwargs, shape",
    [({}, (2, 4, 5, 7)), ({"chunk": 2, "groups": 2}, (1, 4, 6, 3)), ({"directions": ("r2l", "t2b"), "d_inner": 6}, (1, 4, 1, 5))],
)  # fmt: skip
def test_layer_matches_spec_section_6(kwargs, shape):
    """The whole layer, float64 and float32, against SPEC section 6 evaluated independently."""
    layer = randomize_(GSPN(4, d_proxy=3, **kwargs), seed=8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    expected = layer_from_spec(layer, x)
    with torch.no_grad():
        got32 = layer(x)
        got64 = copy.deepcopy(layer).double()(x.double())
    assert_close_scaled(got64, expected, torch.float64, shape[2] + shape[3] + layer.d_inner, "float64 layer")
    assert_close_scaled(got32, expected, torch.float32, shape[2] + shape[3] + layer.d_inner, "float32 layer")


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"dim": 0}, ValueError, "dim"),
        ({"dim": 4, "groups": 3}, ValueError, "groups"),
        ({"dim": 4, "directions": ("t2b", "up")}, ValueError, "direction"),
        ({"dim": 4, "directions": ()}, ValueError, "directions"),
        ({"dim": 4, "chunk": -2}, ValueError, "chunk"),
        ({"dim": 4.0}, TypeError, "dim"),
    ],
)
def test_gspn_rejects_bad_configuration(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        GSPN(**kwargs)


def test_gspn_rejects_wrong_input_channels():
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 4, H, W\); got \(1, 3, 5, 5\)"):
        GSPN(4)(torch.randn(1, 3, 5, 5))


def test_block_and_classifier():
    block = GSPNBlock(8, d_proxy=4)
    x = torch.randn(2, 8, 6, 6)
    assert block(x).shape == x.shape
    model = TinyGSPNClassifier(num_classes=7).eval()
    for H, W in ((32, 32), (24, 40)):
        logits = model(torch.randn(2, 3, H, W))
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
