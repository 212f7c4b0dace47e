"""Property-based conformance testing of GSPN scan implementations (public API).

Anyone writing a GSPN kernel (a TVM schedule, Triton, CUDA, another compiler, a runtime's operator)
certifies it against the reference in a few lines::

    from gspn_ref.testing import assert_scan_matches

    def my_scan(x, lam, gl, gm, gr, direction, chunk):   # the arguments of gspn_scan_ref
        return my_kernel(x, lam, gl, gm, gr, direction, chunk)

    assert_scan_matches(my_scan, backward=True, dtypes=(torch.float32, torch.float16))

``assert_scan_matches`` draws inputs with Hypothesis across shapes (including 1-wide maps and odd
sizes), directions, chunks (often not dividing the line count) and weight groups, and raises
``AssertionError`` naming the failing case when the output, or the gradients of all five inputs
for one upstream gradient, differ from the float64 reference beyond a tolerance derived from the
dtype (:func:`scan_tolerance`). The strategies, the comparison and the conformance vectors of the
original GSPN code (:func:`conformance_vectors`, and the original network's run:
:func:`official_network_vectors`) are available separately. See ``docs/backends.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .directions import DIRECTIONS, line_count
from .fused import gspn_fused_scan_backward_ref, gspn_fused_scan_ref
from .normalize import normalize_weights
from .scan import accumulation_dtype, gspn_scan_backward_ref, gspn_scan_ref

ScanFn = Callable[..., torch.Tensor]
GRAD_NAMES = ("x", "lam", "gl", "gm", "gr")
FUSED_GRAD_NAMES = ("u", "lam", "al", "am", "ar", "gate", "skip")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class ScanCase(NamedTuple):
    """One scan configuration: shapes ``x`` (B, C, H, W), weights (B, G, H, W)."""

    B: int
    C: int
    G: int
    H: int
    W: int
    direction: str
    chunk: int

    @property
    def n_lines(self) -> int:
        return line_count(self.direction, self.H, self.W)


@st.composite
def scan_cases(draw, max_side: int = 9, max_batch: int = 2, max_groups: int = 3,
               directions: Sequence[str] = DIRECTIONS) -> ScanCase:  # fmt: skip
    """Hypothesis strategy of valid :class:`ScanCase` s: ``G | C``, sides from 1 to ``max_side``,
    ``chunk`` 0 or 1 … lines + 1 (often not dividing the line count)."""
    B = draw(st.integers(1, max_batch))
    G = draw(st.integers(1, max_groups))
    C = G * draw(st.integers(1, 3))
    H = draw(st.integers(1, max_side))
    W = draw(st.integers(1, max_side))
    direction = draw(st.sampled_from(tuple(directions)))
    n_lines = line_count(direction, H, W)
    chunk = draw(st.one_of(st.just(0), st.integers(1, n_lines + 1)))
    return ScanCase(B, C, G, H, W, direction, chunk)


def scan_inputs(case: ScanCase, dtype: torch.dtype = torch.float32, device="cpu", *, seed: int = 0,
                normalized: bool = True):  # fmt: skip
    """``(x, lam, gl, gm, gr)`` for ``case`` in ``dtype``: drawn in float64, then rounded once.

    Normalized weights are row-stochastic for the case's direction; otherwise they are
    ``sigmoid(logits) / 3`` (contracting, not normalized), like the original code's test data.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.B, case.C, case.H, case.W, generator=gen, dtype=torch.float64)
    lam = torch.randn(case.B, case.C, case.H, case.W, generator=gen, dtype=torch.float64)
    logits = torch.randn(3, case.B, case.G, case.H, case.W, generator=gen, dtype=torch.float64) * 2
    gl, gm, gr = normalize_weights(*logits, case.direction) if normalized else torch.sigmoid(logits) / 3
    return tuple(t.to(dtype=dtype, device=device) for t in (x, lam, gl, gm, gr))


def make_scan_inputs(B, C, G, H, W, dtype=torch.float32, seed=0, normalized=True, *, direction="t2b",
                     device="cpu"):  # fmt: skip
    """``(x, lam, gl, gm, gr)`` for the given sizes: :func:`scan_inputs` of that :class:`ScanCase`."""
    return scan_inputs(ScanCase(B, C, G, H, W, direction, 0), dtype, device, seed=seed, normalized=normalized)


@st.composite
def layer_configs(draw, max_dim: int = 8) -> dict:
    """Hypothesis strategy of keyword arguments for :class:`gspn_ref.GSPN` (dim, d_inner, d_proxy,
    groups dividing d_inner, a subset of directions, chunk)."""
    dim = draw(st.integers(1, max_dim))
    d_inner = draw(st.integers(1, 2 * max_dim))
    groups = draw(st.sampled_from([g for g in range(1, d_inner + 1) if d_inner % g == 0]))
    directions = draw(st.lists(st.sampled_from(DIRECTIONS), min_size=1, max_size=4, unique=True))
    return {"dim": dim, "d_inner": d_inner, "d_proxy": draw(st.integers(1, 8)), "groups": groups,
            "directions": tuple(directions), "chunk": draw(st.integers(0, 4))}  # fmt: skip


def scan_tolerance(dtype: torch.dtype, n_terms: int) -> float:
    """Relative tolerance of a scan result in ``dtype`` with ``n_terms`` accumulated terms.

    One rounding of the output to ``dtype`` (2 eps) plus one rounding error of the accumulation
    dtype per accumulated step (lines, or lines times channels for group-summed weight gradients),
    with a factor 8 for the three-neighbour sums. Applied as ``|a - e| <= tol * (|e| + max|e|)``:
    relative to the output's scale, since the terms of a scan can cancel.
    """
    eps = torch.finfo(dtype).eps
    acc_eps = torch.finfo(accumulation_dtype(dtype)).eps
    return 2 * eps + 8 * acc_eps * (n_terms + 1)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, n_terms: int,
                        what: str = "output", *, scale: float | None = None) -> None:  # fmt: skip
    """Assert ``actual`` matches ``expected`` within :func:`scan_tolerance`; prints the max difference.

    ``scale`` (default ``max |expected|``) is the magnitude errors are measured against."""
    actual = torch.as_tensor(actual)
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    tol = scan_tolerance(dtype, n_terms)
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 1.0
    scale = max(scale, 1e-30)
    err = (a - e).abs()
    worst = err.max().item() if err.numel() else 0.0
    print(f"{what}: max |diff| = {worst:.3e}, scale = {scale:.3e}, rtol = {tol:.3e}")
    bad = ~(err <= tol * (e.abs() + scale))  # NaN counts as a mismatch
    if bad.any():
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements differ; max |diff| {worst:.3e} > "
            f"{tol:.3e} * (|expected| + scale {scale:.3e})"
        )


def reference_outputs(case: ScanCase, inputs, gh=None):
    """float64 reference ``h`` (and, given ``gh``, the five input gradients) for ``inputs``."""
    x, lam, gl, gm, gr = (t.detach().double().cpu() for t in inputs)
    h = gspn_scan_ref(x, lam, gl, gm, gr, case.direction, case.chunk)
    if gh is None:
        return h, None
    grads = gspn_scan_backward_ref(gh.double().cpu(), x, lam, gl, gm, gr, h, case.direction, case.chunk)
    return h, grads


def check_scan_case(fn: ScanFn, case: ScanCase, dtype: torch.dtype, *, backward: bool | Callable = True,
                    device="cpu", seed: int = 0, normalized: bool = True) -> None:  # fmt: skip
    """Compare ``fn`` with the reference on one case (see :func:`assert_scan_matches`); the inputs
    are :func:`scan_inputs` of ``case`` with ``seed`` and ``normalized``."""
    inputs = scan_inputs(case, dtype, device, seed=seed, normalized=normalized)
    gh = None
    if backward:
        gh = torch.randn(case.B, case.C, case.H, case.W, generator=torch.Generator().manual_seed(seed + 1),
                         dtype=torch.float64).to(dtype=dtype, device=device)  # fmt: skip
    expected_h, expected_grads = reference_outputs(case, inputs, gh)
    weights = "normalized" if normalized else "unnormalized"
    label = f"{case} {str(dtype).replace('torch.', '')} seed={seed} {weights}"
    if callable(backward) and not isinstance(backward, bool):
        h = fn(*inputs, case.direction, case.chunk)
        grads = backward(gh, *inputs, h, case.direction, case.chunk)
    elif backward:
        leaves = [t.clone().requires_grad_() for t in inputs]
        h = fn(*leaves, case.direction, case.chunk)
        grads = torch.autograd.grad(h, leaves, gh, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    else:
        with torch.no_grad():
            h = fn(*inputs, case.direction, case.chunk)
    assert_close_scaled(h, expected_h, dtype, case.n_lines, f"{label}: h")
    if expected_grads is not None:
        group_terms = case.n_lines * (case.C // case.G)
        for name, got, want in zip(GRAD_NAMES, grads, expected_grads):
            terms = case.n_lines if name in ("x", "lam") else group_terms
            assert_close_scaled(got, want, dtype, terms, f"{label}: d{name}")


def assert_scan_matches(fn: ScanFn, *, backward: bool | Callable = True, dtypes=(torch.float32,),
                        max_examples: int | None = None, max_side: int = 9, directions: Sequence[str] = DIRECTIONS,
                        device="cpu") -> None:  # fmt: skip
    """Hold ``fn`` to the reference on Hypothesis-drawn valid inputs.

    ``fn(x, lam, gl, gm, gr, direction, chunk) -> h`` takes the arguments of ``gspn_scan_ref``.
    ``backward=True`` differentiates ``fn`` with autograd under one random upstream gradient;
    a callable ``backward(gh, x, lam, gl, gm, gr, h, direction, chunk)`` is checked instead, and
    ``False`` checks the output only (for inference-only backends). Every dtype of ``dtypes`` is
    drawn (tolerances from :func:`scan_tolerance`), with normalized and unnormalized weights. ``max_examples`` defaults to the active
    Hypothesis profile's. Raises ``AssertionError`` naming the case, the tensor and the error.
    """
    _property_run(fn, "x, lam, gl, gm, gr, direction, chunk", dtypes, max_examples, max_side, directions,
                  lambda case, dtype, seed, normalized: check_scan_case(
                      fn, case, dtype, backward=backward, device=device, seed=seed, normalized=normalized),
                  normalized=st.booleans())  # fmt: skip


def _property_run(fn, arguments: str, dtypes, max_examples, max_side, directions, check, **extra_strategies) -> None:
    """Check ``fn`` and ``dtypes``, then run ``check(case, dtype, seed, **extra)`` on Hypothesis-drawn
    cases (the common body of :func:`assert_scan_matches` and :func:`assert_fused_scan_matches`)."""
    if not callable(fn):
        raise TypeError(f"fn: expected a callable taking ({arguments}); got {fn!r}")
    dtypes = tuple(dtypes)
    bad = [d for d in dtypes if not (isinstance(d, torch.dtype) and d.is_floating_point)]
    if not dtypes or bad:
        raise TypeError(f"dtypes: expected floating torch dtypes; got {dtypes!r}")

    @settings(max_examples=max_examples or settings.default.max_examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(case=scan_cases(max_side=max_side, directions=directions), dtype=st.sampled_from(dtypes),
           seed=st.integers(0, 2**16), **extra_strategies)  # fmt: skip
    def run(case, dtype, seed, **extra):
        check(case, dtype, seed, **extra)

    run()


def fused_inputs(case: ScanCase, dtype: torch.dtype = torch.float32, device="cpu", *, seed: int = 0,
                 logit_scale: float = 2.0):  # fmt: skip
    """``(u, lam, al, am, ar, gate, skip)`` for ``case`` in ``dtype``: drawn in float64 (logits
    times ``logit_scale``), then rounded once."""
    gen = torch.Generator().manual_seed(seed)
    full = [torch.randn(case.B, case.C, case.H, case.W, generator=gen, dtype=torch.float64) for _ in range(4)]
    logits = torch.randn(3, case.B, case.G, case.H, case.W, generator=gen, dtype=torch.float64) * logit_scale
    u, lam, gate, skip = full
    return tuple(t.to(dtype=dtype, device=device) for t in (u, lam, *logits, gate, skip))


def check_fused_case(fn: ScanFn, case: ScanCase, dtype: torch.dtype, *, backward: bool = True, device="cpu",
                     seed: int = 0, logit_scale: float = 2.0) -> None:  # fmt: skip
    """Compare a fused scan ``fn(u, lam, al, am, ar, gate, skip, direction, chunk)`` with the float64
    reference on one case: output and (``backward``) the seven gradients under one upstream gradient."""
    inputs = fused_inputs(case, dtype, device, seed=seed, logit_scale=logit_scale)
    ref_inputs = [t.detach().double().cpu() for t in inputs]
    expected = gspn_fused_scan_ref(*ref_inputs, case.direction, case.chunk)
    label = f"{case} {str(dtype).replace('torch.', '')} seed={seed} logit_scale={logit_scale}"
    if backward:
        gy = torch.randn(case.B, case.C, case.H, case.W, generator=torch.Generator().manual_seed(seed + 1),
                         dtype=torch.float64).to(dtype=dtype, device=device)  # fmt: skip
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves, case.direction, case.chunk)
        grads = torch.autograd.grad(y, leaves, gy, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    else:
        with torch.no_grad():
            y = fn(*inputs, case.direction, case.chunk)
    assert_close_scaled(y, expected, dtype, case.n_lines, f"{label}: y")
    if backward:
        gy64 = gy.double().cpu()
        want = gspn_fused_scan_backward_ref(gy64, *ref_inputs, case.direction, case.chunk)
        # Logit gradients are measured against the weight gradients they come from: where a weight
        # is forced (gm == 1 on a one-position line) the logit gradient is 0 plus rounding noise.
        u, lam, al, am, ar, gate, _ = ref_inputs
        weights = normalize_weights(al, am, ar, case.direction)
        h = gspn_scan_ref(u, lam, *weights, case.direction, case.chunk)
        weight_grads = gspn_scan_backward_ref(gy64 * gate, u, lam, *weights, h, case.direction, case.chunk)[2:]
        weight_scale = max(g.abs().max().item() for g in weight_grads)
        group_terms = case.n_lines * (case.C // case.G)
        for name, got, w in zip(FUSED_GRAD_NAMES, grads, want):
            logit = name in ("al", "am", "ar")
            scale = max(weight_scale, w.abs().max().item()) if logit else None
            terms = group_terms if logit else case.n_lines
            assert_close_scaled(got, w, dtype, terms, f"{label}: d{name}", scale=scale)


def assert_fused_scan_matches(fn: ScanFn, *, backward: bool = True, dtypes=(torch.float32,),
                              max_examples: int | None = None, max_side: int = 9,
                              directions: Sequence[str] = DIRECTIONS, device="cpu") -> None:  # fmt: skip
    """Hold a fused scan to the reference on Hypothesis-drawn valid inputs, like
    :func:`assert_scan_matches`. ``fn(u, lam, al, am, ar, gate, skip, direction, chunk) -> y`` takes
    the arguments of :func:`gspn_ref.gspn_fused_scan_ref`; logits are drawn at scales 0.5 to 8
    (8 saturates the sigmoid). Raises ``AssertionError`` naming the case, the tensor and the error.
    """
    _property_run(fn, "u, lam, al, am, ar, gate, skip, direction, chunk", dtypes, max_examples, max_side, directions,
                  lambda case, dtype, seed, logit_scale: check_fused_case(
                      fn, case, dtype, backward=backward, device=device, seed=seed, logit_scale=logit_scale),
                  logit_scale=st.sampled_from((0.5, 2.0, 8.0)))  # fmt: skip


def _packaged_npz(name: str) -> dict[str, np.ndarray]:
    """Every array of the package data file ``data/<name>``, read without pickles."""
    data = resources.files(__package__).joinpath("data", name)
    with resources.as_file(data) as path, np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def conformance_vectors() -> list[dict[str, np.ndarray]]:
    """The scans of the original GSPN code (float64, direction ``l2r``, chunk 0, per-channel,
    weights not normalized): a list of dicts with keys ``x, lam, gl, gm, gr, h``."""
    npz = _packaged_npz("official_l2r_vectors.npz")
    n = 1 + max(int(key.split("_", 1)[0]) for key in npz)
    return [{name: npz[f"{k}_{name}"] for name in ("x", "lam", "gl", "gm", "gr", "h")} for k in range(n)]


def official_network_vectors() -> dict[str, np.ndarray]:
    """The original classification network (tiny configuration, ``EMBED_DIM`` 16, 10 classes, random
    weights) as the original code ran it: ``state/<name>`` (its state dict), ``input``, ``logits``,
    ``logits_float64``, intermediates (``patch_embed_output``, ``block0_op_input``,
    ``block0_op_output``, ``layer{i}_output``), and ``config`` and ``blocks`` (JSON strings)."""
    return _packaged_npz("official_gspn_tiny16.npz")


def official_network_state(vectors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The state dict held in :func:`official_network_vectors` (``state/`` prefixes removed)."""
    return {k.removeprefix("state/"): torch.from_numpy(v) for k, v in vectors.items() if k.startswith("state/")}
