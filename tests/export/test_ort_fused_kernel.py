"""The ONNX Runtime kernel of the fused scan, ``gspn::GSPNFusedScan``, in a one-node model.

Its results against the float64 reference (the public conformance API, float32 and float16, odd
sizes, one-wide maps, chunks, the column-scan paths), and its errors: bad shapes, element types
and attributes are ONNX Runtime errors naming the argument, what was expected and what was given.
The model is built here with ``onnx.helper`` (the torch -> ONNX translation lives in ``export``).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

import export
from gspn_ref.onnx_op import DOMAIN, FUSED_INPUT_NAMES, FUSED_OP_TYPE, FUSED_OUTPUT_NAMES, OP_VERSION
from gspn_ref.testing import ScanCase, assert_fused_scan_matches, check_fused_case, fused_inputs

ELEMENT_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


def fused_node_model(direction, chunk=0, dtype="float32", *, attributes=None, declare_shapes=True):
    """A model of one GSPNFusedScan node with symbolic (B, C, H, W) / (B, G, H, W) inputs (no
    declared shapes when ``declare_shapes`` is False, so that only the kernel checks them).
    ``attributes`` replaces the node's attributes (default: direction and chunk)."""
    elem = ELEMENT_TYPES[dtype]
    data, logits = ["B", "C", "H", "W"], ["B", "G", "H", "W"]
    inputs = [
        helper.make_tensor_value_info(
            name, elem, (logits if name in ("al", "am", "ar") else data) if declare_shapes else None
        )
        for name in FUSED_INPUT_NAMES
    ]
    if attributes is None:
        attributes = {"direction": direction, "chunk": int(chunk)}
    node = helper.make_node(FUSED_OP_TYPE, list(FUSED_INPUT_NAMES), list(FUSED_OUTPUT_NAMES),
                            name="fused_scan", domain=DOMAIN, **attributes)  # fmt: skip
    outputs = [helper.make_tensor_value_info(FUSED_OUTPUT_NAMES[0], elem, data if declare_shapes else None)]
    graph = helper.make_graph([node], f"gspn_fused_scan_{direction}", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])


@functools.lru_cache(maxsize=None)
def fused_session(direction, chunk, dtype):
    return export.session(fused_node_model(direction, chunk, dtype), intra_op_num_threads=2)


def ort_fused_scan(u, lam, al, am, ar, gate, skip, direction, chunk):
    """The fused scan through ONNX Runtime, on torch tensors (float32 or float16)."""
    dtype = str(u.dtype).replace("torch.", "")
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(FUSED_INPUT_NAMES, (u, lam, al, am, ar, gate, skip))}
    (y,) = fused_session(direction, int(chunk), dtype).run(None, feeds)
    return torch.from_numpy(y)


def test_fused_kernel_matches_the_reference():
    assert_fused_scan_matches(ort_fused_scan, backward=False, dtypes=(torch.float32, torch.float16))


@pytest.mark.parametrize(
    "case",
    [
        ScanCase(1, 1, 1, 1, 1, "t2b", 0),
        ScanCase(1, 3, 1, 1, 13, "l2r", 0),  # one-high map: column lines of one position
        ScanCase(1, 3, 3, 13, 1, "b2t", 0),  # one-wide map: row lines of one position
        ScanCase(2, 6, 3, 1, 11, "r2l", 4),
        ScanCase(2, 6, 2, 11, 1, "t2b", 3),
        ScanCase(1, 4, 2, 70, 37, "l2r", 9),  # lines longer than 64: the through-memory path
        ScanCase(1, 2, 1, 40, 90, "r2l", 0),  # several strips of columns (32 wide)
        ScanCase(1, 2, 1, 130, 300, "l2r", 7),  # a tall plane's wide strips (5 x ~60 columns)
        ScanCase(1, 2, 2, 33, 129, "b2t", 16),
        # rows of whole vectors normalized as one range (8, 24, 56), beside 16-blocks (48 = 3 x 16)
        ScanCase(1, 3, 3, 5, 8, "t2b", 2),
        ScanCase(2, 2, 1, 7, 24, "b2t", 0),
        ScanCase(1, 2, 2, 6, 56, "t2b", 0),
        ScanCase(1, 2, 2, 4, 48, "b2t", 3),
        # float32 planes of short rows scanned as one range (rows < 32, <= 1024 positions), grouped
        # weights, chunks; 40 x 28 is over the positions and takes the line path
        ScanCase(2, 4, 2, 9, 7, "t2b", 2),
        ScanCase(1, 3, 3, 14, 14, "b2t", 5),
        ScanCase(1, 2, 1, 36, 28, "t2b", 0),
        ScanCase(1, 2, 1, 40, 28, "b2t", 0),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_fused_kernel_odd_sizes_and_column_paths(case, dtype):
    for logit_scale in (0.5, 8.0):
        check_fused_case(ort_fused_scan, case, dtype, backward=False, seed=case.H * case.W, logit_scale=logit_scale)


def test_fused_kernel_is_the_unfused_composition_in_float32():
    # The fused kernel against the unfused kernel fed with the same weights, all in float32.
    from gspn_ref import normalize_weights

    case = ScanCase(2, 4, 2, 17, 23, "r2l", 5)
    u, lam, al, am, ar, gate, skip = fused_inputs(case, torch.float32, seed=3, logit_scale=4.0)
    weights = normalize_weights(al, am, ar, case.direction)
    h = export.session(export.scan_model(case.direction, case.chunk)).run(None, export.scan_feeds(u, lam, *weights))[0]
    expected = h * gate.numpy() + u.numpy() * skip.numpy()
    y = ort_fused_scan(u, lam, al, am, ar, gate, skip, case.direction, case.chunk).numpy()
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


# ---- errors ----------------------------------------------------------------------------------


def good_feeds(B=2, C=4, G=2, H=5, W=6):
    inputs = fused_inputs(ScanCase(B, C, G, H, W, "t2b", 0), torch.float32, seed=1)
    return {name: t.numpy() for name, t in zip(FUSED_INPUT_NAMES, inputs)}


def bad_feeds():
    """(feeds, words the error message must contain)."""
    good = good_feeds()
    zeros = functools.partial(np.zeros, dtype=np.float32)
    cases = [
        ("u-rank-3", {"u": good["u"][0]}, ["'u'", "4-D", "rank 3"]),
        ("gate-shape", {"gate": zeros((2, 4, 5, 7))}, ["'gate'", "shape of 'u'", "(2, 4, 5, 6)", "(2, 4, 5, 7)"]),
        ("skip-shape", {"skip": zeros((2, 4, 1, 6))}, ["'skip'", "shape of 'u'", "(2, 4, 1, 6)"]),
        ("lam-shape", {"lam": zeros((1, 4, 5, 6))}, ["'lam'", "(1, 4, 5, 6)"]),
        ("al-batch", {"al": zeros((3, 2, 5, 6))}, ["'al'", "(B, G, H, W)", "(3, 2, 5, 6)"]),
        ("al-width", {"al": zeros((2, 2, 5, 5))}, ["'al'", "(2, 2, 5, 5)"]),
        ("groups-not-dividing", {k: zeros((2, 3, 5, 6)) for k in ("al", "am", "ar")}, ["G = 3", "'al'", "C = 4", "'u'"]),
        ("am-shape", {"am": zeros((2, 1, 5, 6))}, ["'am'", "shape of 'al'", "(2, 1, 5, 6)"]),
        ("ar-rank-5", {"ar": zeros((2, 2, 5, 6, 1))}, ["'ar'", "rank 5"]),
        ("empty", {k: v[:0] for k, v in good.items()}, ["'u'", "empty", "(0, 4, 5, 6)"]),
    ]
    return [pytest.param({**good, **changes}, words, id=what) for what, changes, words in cases]


@pytest.fixture(scope="module")
def unshaped_session():
    return export.session(fused_node_model("l2r", 0, declare_shapes=False))


@pytest.mark.parametrize("feeds, words", bad_feeds())
def test_bad_inputs_are_errors_naming_the_argument(unshaped_session, feeds, words):
    with pytest.raises(InvalidArgument, match="GSPNFusedScan: ") as info:
        unshaped_session.run(None, feeds)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_session_still_works_after_errors(unshaped_session):
    with pytest.raises(InvalidArgument, match=r"input 'gate' must have the shape of 'u' \(2, 4, 5, 6\)"):
        unshaped_session.run(None, {**good_feeds(), "gate": np.zeros((1, 1, 1, 1), np.float32)})
    (y,) = unshaped_session.run(None, good_feeds())
    assert y.shape == (2, 4, 5, 6) and np.isfinite(y).all()


def test_mixed_element_types_are_rejected(unshaped_session):
    with pytest.raises(InvalidArgument, match="Unexpected input data type"):
        unshaped_session.run(None, {**good_feeds(), "skip": good_feeds()["skip"].astype(np.float16)})
    model = fused_node_model("l2r", 0)
    model.graph.input[2].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(Fail, match="no kernel def matches node inputs for Op: GSPNFusedScan"):
        export.session(model)


@pytest.mark.parametrize(
    "attributes, words",
    [
        ({"direction": "up"}, ["'direction'", "t2b", "'up'"]),
        ({"chunk": 0}, ["'direction'", "required"]),
        ({"direction": "t2b", "chunk": -2}, ["'chunk'", ">= 0", "-2"]),
        ({"direction": "t2b", "chunk": 1.5}, ["'chunk'", "int", "got a float"]),
        ({"direction": 1}, ["'direction'", "must be a string", "got an int"]),
    ],
    ids=["unknown-direction", "missing-direction", "negative-chunk", "float-chunk", "int-direction"],
)
def test_bad_attributes_are_errors(attributes, words):
    with pytest.raises(RuntimeException, match="GSPNFusedScan: attribute ") as info:
        export.session(fused_node_model("t2b", attributes=attributes))
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
