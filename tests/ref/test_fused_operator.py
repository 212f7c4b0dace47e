"""The fused operator gspn::fused_scan: logits in, normalization, scan, gate and skip in one op.

Held against an oracle sharing no code with gspn_ref: the normalization written position by
position here and the element-wise float64 recurrence ``naive_scan_float64``.
"""


import pytest
import torch
from helpers import FLOAT_DTYPES, assert_close_scaled, naive_scan_float64, scan_cases
from hypothesis import given
from hypothesis import strategies as st

from gspn_ref import DIRECTIONS, gspn_fused_scan, gspn_fused_scan_ref, normalize_weights, normalize_weights_backward
from gspn_ref.testing import ScanCase, assert_fused_scan_matches, fused_inputs


def oracle_weights(al, am, ar, direction):
    """docs/operator.md ("Weight normalization") position by position in float64."""
    al, am, ar = (t.detach().double() for t in (al, am, ar))
    out = [torch.empty_like(al) for _ in range(3)]
    B, G, H, W = al.shape
    columns = direction in ("l2r", "r2l")
    P = H if columns else W
    for i in range(H):
        for j in range(W):
            p = i if columns else j
            s = [1 / (1 + torch.exp(-a[:, :, i, j])) for a in (al, am, ar)]
            s[0] = s[0] * (p > 0)
            s[2] = s[2] * (p < P - 1)
            total = torch.clamp(s[0] + s[1] + s[2], min=1e-7)
            for k in range(3):
                out[k][:, :, i, j] = s[k] / total
    return out


def oracle(u, lam, al, am, ar, gate, skip, direction, chunk):
    h = naive_scan_float64(u, lam, *oracle_weights(al, am, ar, direction), direction, chunk)
    return h * gate.double() + u.double() * skip.double()


@given(case=scan_cases(max_side=6), dtype=st.sampled_from(FLOAT_DTYPES), scale=st.sampled_from([0.5, 2.0, 8.0]))
def test_fused_operator_matches_oracle(case, dtype, scale):
    inputs = fused_inputs(case, dtype, logit_scale=scale)
    y = gspn_fused_scan(*inputs, case.direction, case.chunk)
    assert y.dtype == dtype and y.shape == inputs[0].shape and y.is_contiguous()
    assert_close_scaled(y, oracle(*inputs, case.direction, case.chunk), dtype, case.n_lines)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [0, 2])
def test_gradcheck_float64(direction, chunk):
    inputs = [t.requires_grad_() for t in fused_inputs(ScanCase(2, 4, 2, 3, 4, direction, chunk), torch.float64, seed=3)]
    assert torch.autograd.gradcheck(lambda *a: gspn_fused_scan(*a, direction, chunk), inputs)


def test_one_position_lines_have_exactly_zero_logit_gradients():
    """A line of one position has gm == 1 whatever am holds: dam must be exactly zero there."""
    u, lam, al, am, ar, gate, skip = (t.requires_grad_() for t in fused_inputs(ScanCase(1, 2, 2, 4, 1, "t2b", 0), torch.float32))
    gspn_fused_scan(u, lam, al, am, ar, gate, skip, "t2b", 0).sum().backward()
    assert torch.equal(am.grad, torch.zeros_like(am)) and torch.equal(al.grad, torch.zeros_like(al))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_normalization_adjoint_equals_autograd(direction):
    """Including positions at the 1e-7 floor (all three logits very negative) and one-position lines."""
    for shape in ((2, 3, 4, 5), (1, 2, 1, 3), (1, 2, 3, 1)):
        logits = [torch.randn(shape, dtype=torch.float64) * 3 for _ in range(3)]
        for t in logits:
            t[0, 0, 0, 0] = -25.0  # sigmoid(-25) ~ 1.4e-11: the sum is clamped to the floor
        leaves = [t.clone().requires_grad_() for t in logits]
        weights = normalize_weights(*leaves, direction)
        upstream = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
        expected = torch.autograd.grad(weights, leaves, upstream)
        got = normalize_weights_backward(*upstream, *logits, direction)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("direction", ["t2b", "l2r"])
def test_opcheck(direction):
    for dtype, case in ((torch.float32, ScanCase(2, 4, 2, 5, 3, direction, 2)), (torch.float64, ScanCase(1, 3, 3, 1, 4, direction, 0))):
        args = fused_inputs(case, dtype)
        torch.library.opcheck(torch.ops.gspn.fused_scan.default, (*(t.requires_grad_() for t in args), direction, case.chunk))
        gy = torch.randn_like(args[0])
        torch.library.opcheck(torch.ops.gspn.fused_scan_backward.default, (gy, *(t.detach() for t in args), direction, case.chunk))


def test_torch_compile_and_export_keep_one_fused_node():
    case = ScanCase(2, 4, 2, 6, 5, "r2l", 3)
    inputs = fused_inputs(case, torch.float32)

    class Mixer(torch.nn.Module):
        def forward(self, *t):
            return gspn_fused_scan(*t, case.direction, case.chunk)

    compiled = torch.compile(Mixer(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), gspn_fused_scan_ref(*inputs, case.direction, case.chunk))
    program = torch.export.export(Mixer(), inputs)
    fused = [n for n in program.graph.nodes if n.target == torch.ops.gspn.fused_scan.default]
    assert len(fused) == 1 and fused[0].args[-2:] == (case.direction, case.chunk)


def test_half_precision_is_rounded_once():
    """float16 output equals the float64 result rounded once (weights and h are never rounded)."""
    case = ScanCase(1, 2, 1, 16, 16, "l2r", 0)
    inputs = fused_inputs(case, torch.float16, seed=4)
    y = gspn_fused_scan(*inputs, case.direction, case.chunk)
    exact = oracle(*inputs, case.direction, case.chunk)
    ulp = torch.finfo(torch.float16).eps * exact.abs().max().item()
    assert (y.double() - exact).abs().max().item() <= 2 * ulp


BAD = [
    (4, torch.randn(1, 3, 3, 5), ValueError, ["ar", "G from al"]),
    (5, torch.randn(1, 4, 3, 6), ValueError, ["gate", "(1, 4, 3, 5)", "(1, 4, 3, 6)", "shape of u"]),
    (6, torch.ones(1, 4, 3, 5, dtype=torch.float64), TypeError, ["skip", "float32", "float64"]),
    (0, torch.randn(4, 3, 5), ValueError, ["u", "4-D"]),
    (1, torch.ones(1, 4, 3, 5, device="meta"), ValueError, ["lam", "device", "meta"]),
    (7, "diagonal", ValueError, ["direction", "'diagonal'"]),
    (8, -2, ValueError, ["chunk", "-2"]),
]


@pytest.mark.parametrize("index, value, exc, words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
@pytest.mark.parametrize("entry", [gspn_fused_scan, gspn_fused_scan_ref], ids=["op", "ref"])
def test_bad_inputs_raise_named_errors(entry, index, value, exc, words):
    args = [*fused_inputs(ScanCase(1, 4, 2, 3, 5, "t2b", 0), torch.float32), "t2b", 0]
    args[index] = value
    with pytest.raises(exc) as info:
        entry(*args)
    print(info.value)
    assert all(w in str(info.value) for w in words), (words, str(info.value))


def test_public_property_check_catches_a_wrong_kernel():
    """assert_fused_scan_matches certifies the operator and fails a kernel that forgets the mask."""
    assert_fused_scan_matches(gspn_fused_scan, dtypes=(torch.float32, torch.float16), max_examples=15)

    def unmasked(u, lam, al, am, ar, gate, skip, direction, chunk):
        s = [torch.sigmoid(t) for t in (al, am, ar)]
        total = s[0] + s[1] + s[2]
        from gspn_ref import gspn_scan

        return gspn_scan(u, lam, *(t / total for t in s), direction, chunk) * gate + u * skip

    with pytest.raises(AssertionError, match="y|d"):
        assert_fused_scan_matches(unmasked, backward=False, max_examples=25)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_logits_of_weights_outside_the_line_are_never_read(direction):
    """al at p = 0 and ar at p = P-1 point outside the line: NaN or inf there changes nothing."""
    case = ScanCase(1, 2, 2, 5, 4, direction, 0)
    u, lam, al, am, ar, gate, skip = fused_inputs(case, torch.float32, seed=8)
    expected = oracle(u, lam, al, am, ar, gate, skip, direction, 0)
    first, last = ((..., 0, slice(None)), (..., -1, slice(None))) if direction in ("l2r", "r2l") else ((..., 0), (..., -1))
    al, ar = al.clone(), ar.clone()
    al[first], ar[last] = float("nan"), float("inf")
    leaves = [t.requires_grad_() for t in (u, lam, al, am, ar, gate, skip)]
    y = gspn_fused_scan(*leaves, direction, 0)
    assert_close_scaled(y, expected, torch.float32, case.n_lines)
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.equal(al.grad[first], torch.zeros_like(al.grad[first]))
