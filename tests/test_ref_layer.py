"""Weight normalization, the GSPN layer, its aggregated affinity, the block and the classifier."""

import pytest
import torch
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
    if (H if is_column(direction) else W) == 1:
        assert (gm[above_floor] == 1).all()


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


@pytest.mark.parametrize("chunk, groups", [(0, None), (2, 3)])
def test_layer_affinity_reproduces_aggregation(chunk, groups):
    """SPEC section 6: y[c] == (sum_k alpha_k (gate_k A_k + diag skip_k)) u[c]: dense, not triangular."""
    layer = randomize_(GSPN(3, d_proxy=4, chunk=chunk, groups=groups), seed=3).double()
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        y = layer.aggregate(x)
        u, _ = layer.propagation_inputs(x)
    for channel in (0, layer.d_inner - 1):
        affinity, maps = layer_affinity(layer, x, channel, per_direction=True)
        assert affinity.shape == (1, 20, 20) and len(maps) == 4
        torch.testing.assert_close(affinity @ u[:, channel].flatten(1)[..., None], y[:, channel].flatten(1)[..., None])
        if chunk == 0:  # global propagation: dense pairwise connections
            assert (affinity.abs() > 1e-12).float().mean() > 0.9
        for A in maps:
            assert (A.abs() > 1e-12).float().mean() < 0.75  # each direction alone is triangular
    with pytest.raises(ValueError, match="channel"):
        layer_affinity(layer, x, layer.d_inner)


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
