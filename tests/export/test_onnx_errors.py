"""Malformed inputs and models give ONNX Runtime errors naming the problem, never a crash."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidGraph,
    RuntimeException,
)

import export
from helpers import scan_feeds_of, shape_free_scan_model, with_attributes

# What ONNX Runtime raises: InvalidArgument for a kernel's (or its own input check's) invalid
# argument status at run time, RuntimeException for a kernel that refuses its node when the
# session is created (bad attributes), InvalidGraph for a node that does not fit the schema, Fail
# for element types no kernel of the library accepts.


def bad_feeds():
    """(what, feeds, words the error message must contain)."""
    good = scan_feeds_of()
    cases = []

    def case(what, words, **changes):
        cases.append(pytest.param({**good, **changes}, words, id=what))

    case("x-rank-3", ["'x'", "4-D", "rank 3"], x=good["x"][0])
    case("lam-shape", ["'lam'", "(2, 4, 5, 6)", "(2, 4, 5, 7)"], lam=np.zeros((2, 4, 5, 7), np.float32))
    case("gl-batch", ["'gl'", "(3, 2, 5, 6)"], gl=np.zeros((3, 2, 5, 6), np.float32))
    case("gl-height", ["'gl'", "(2, 2, 4, 6)"], gl=np.zeros((2, 2, 4, 6), np.float32))
    case("groups-not-dividing",  ["G = 3", "C = 4"],
         **{k: np.zeros((2, 3, 5, 6), np.float32) for k in ("gl", "gm", "gr")})  # fmt: skip
    case("gm-shape", ["'gm'", "(2, 1, 5, 6)"], gm=np.zeros((2, 1, 5, 6), np.float32))
    case("gr-rank-5", ["'gr'", "rank 5"], gr=np.zeros((2, 2, 5, 6, 1), np.float32))
    empty = {k: v[:0] for k, v in good.items()}
    cases.append(pytest.param(empty, ["'x'", "empty", "(0, 4, 5, 6)"], id="empty"))
    return cases


@pytest.fixture(scope="module")
def t2b_session():
    return export.session(shape_free_scan_model("t2b", 0))


def test_declared_ranks_are_checked_by_onnxruntime_too():
    with pytest.raises(InvalidArgument, match="Invalid rank for input: x Got: 3 Expected: 4"):
        export.session(export.scan_model("t2b", 0)).run(None, {**scan_feeds_of(), "x": scan_feeds_of()["x"][0]})


@pytest.mark.parametrize("feeds, words", bad_feeds())
def test_bad_inputs_at_run_time_are_errors_naming_the_argument(t2b_session, feeds, words):
    with pytest.raises(InvalidArgument, match="GSPNScan: ") as info:
        t2b_session.run(None, feeds)
    message = str(info.value)
    assert "GSPNScan" in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_session_still_works_after_errors(t2b_session):
    for _ in range(2):
        with pytest.raises(InvalidArgument, match=r"input 'lam' must have the shape of 'x' \(2, 4, 5, 6\)"):
            t2b_session.run(None, {**scan_feeds_of(), "lam": np.zeros((1, 1, 1, 1), np.float32)})
    out = t2b_session.run(None, scan_feeds_of())[0]
    assert out.shape == (2, 4, 5, 6) and np.isfinite(out).all()


def test_mixed_element_types_are_rejected():
    session = export.session(shape_free_scan_model("l2r", 0))
    with pytest.raises(InvalidArgument, match="Unexpected input data type"):
        session.run(None, {**scan_feeds_of(), "lam": scan_feeds_of()["lam"].astype(np.float16)})
    # A model whose declared input types differ is refused when the session is created.
    model = export.scan_model("l2r", 0)
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    # (ONNX Runtime's own type inference refuses it, before the library sees the node.)
    with pytest.raises(Fail, match="no kernel def matches node inputs for Op: GSPNScan"):
        export.session(model)


@pytest.mark.parametrize(
    "attributes, words",
    [
        ({"direction": "up"}, ["'direction'", "t2b", "'up'"]),
        ({"direction": None}, ["'direction'", "required"]),
        ({"chunk": -2}, ["'chunk'", ">= 0", "-2"]),
        ({"chunk": 1.5}, ["'chunk'", "int", "got a float"]),
        # Both ran before as if chunk were 0.
        ({"chunk": [2]}, ["'chunk'", "int", "got a list of ints"]),
        ({"chunk": onnx.numpy_helper.from_array(np.array(2, np.int64))}, ["'chunk'", "got a tensor"]),
        # Ran before as t2b (the name was compared up to its first NUL).
        ({"direction": "t2b\0junk"}, ["'direction'", "got 't2b\\x00junk'"]),
        # The raw byte in the message made Python fail to decode it (UnicodeDecodeError).
        ({"direction": b"\xff"}, ["'direction'", "got '\\xff'"]),
        ({"direction": 1}, ["'direction'", "must be a string", "got an int"]),
    ],
    ids=["unknown-direction", "missing-direction", "negative-chunk", "float-chunk", "list-chunk",
         "tensor-chunk", "direction-with-nul", "direction-not-utf8", "int-direction"],
)
def test_bad_attributes_are_errors(attributes, words):
    model = with_attributes(export.scan_model("t2b", 0), **attributes)
    with pytest.raises(RuntimeException, match="GSPNScan: attribute ") as info:
        export.session(model)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("attributes", [{"direction": "up"}, {"chunk": -1}])
def test_portable_conversion_rejects_bad_attributes(attributes):
    with pytest.raises(ValueError, match="direction|chunk"):
        export.make_portable(with_attributes(export.scan_model("t2b", 0), **attributes))


def test_missing_input_is_an_error():
    model = export.scan_model("b2t", 0)
    del model.graph.node[0].input[4]
    del model.graph.input[4]
    with pytest.raises(InvalidGraph, match=r"GSPNScan:1\) has input size 4 not in range \[min=5, max=5\]"):
        export.session(model)


def test_bad_runs_do_not_crash_the_process(tmp_path):
    # Every malformed run again, in a child process: it must end normally (a crash or an
    # out-of-bounds access would kill it with a signal).
    script = textwrap.dedent(
        """
        import sys
        sys.path[:0] = [{tests!r}, {root!r}]
        import numpy as np, torch, export
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
        from helpers import make_scan_inputs
        good = export.scan_feeds(*make_scan_inputs(2, 4, 2, 5, 6, torch.float32))
        bad = [dict(good, x=good["x"][0]), dict(good, lam=np.zeros((2, 4, 5, 7), np.float32)),
               dict(good, gl=np.zeros((2, 3, 5, 6), np.float32), gm=np.zeros((2, 3, 5, 6), np.float32),
                    gr=np.zeros((2, 3, 5, 6), np.float32)),
               {{k: v[:, :, :0] for k, v in good.items()}}, dict(good, gr=np.zeros((2, 2, 5, 6, 1), np.float32))]
        errors = 0
        for direction in ("t2b", "b2t", "l2r", "r2l"):
            model = export.scan_model(direction, 2)
            for value in model.graph.input:
                value.type.tensor_type.ClearField("shape")
            session = export.session(model)
            for feeds in bad:
                try:
                    session.run(None, feeds)
                except InvalidArgument as error:
                    errors += "GSPNScan: input" in str(error) or "GSPNScan: the weight groups" in str(error)
        print("errors", errors)
        """
    ).format(tests=str(Path(__file__).resolve().parents[1]), root=str(Path(__file__).resolve().parents[2]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "errors 20" in result.stdout, result.stdout + result.stderr[-2000:]


def test_missing_headers_fail_with_instructions(tmp_path, monkeypatch):
    from export import build

    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(build.BuildError, match="fetch_ort_headers.sh"):
        build.find_ort_include_dir()
