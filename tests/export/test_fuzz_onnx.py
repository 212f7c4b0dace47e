"""Fuzzing the ONNX Runtime boundary of gspn::GSPNScan with hand-made malformed models and feeds.

Every case runs in a worker subprocess (a crash there cannot take pytest down): the worker creates
a session with the custom-operator library and runs it, then reports either the output or the
error. A case passes when it yields the reference result (``gspn_scan_ref`` on the same inputs) or
an ONNX Runtime error whose message names the argument at fault. A worker killed by a signal, a
hang, a result that differs from the reference, or an error that is not ONNX Runtime's own (or does
not name the argument) fails the test, naming the case.

Run as a script to count outcomes against any build of the library (the README's figures):

    python tests/test_fuzz_onnx.py [--library path/to/libgspn_ortops.so]
"""

from __future__ import annotations

import argparse
import os
import pickle
import select
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

import export  # noqa: E402
import gspn_ref  # noqa: E402
from helpers import (  # noqa: E402
    SCAN_INPUT_NAMES,
    scan_feeds_of,
    scan_tolerance,
    shape_free_scan_model,
    with_attributes,
)

CASE_TIMEOUT_S = 60.0

# The worker: reads length-prefixed pickled (name, model bytes, feeds) from stdin, writes a
# length-prefixed pickled ("ok", outputs) or ("error", exception class path, message) to stdout.
WORKER_SOURCE = textwrap.dedent(
    """
    import os, pickle, struct, sys
    # Replies go to a private copy of stdout; anything else printed (onnxruntime prints some
    # errors) goes to stderr and cannot corrupt them.
    write = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import onnxruntime as ort
    library = sys.argv[1]
    read = sys.stdin.buffer
    while True:
        header = read.read(8)
        if len(header) < 8:
            break
        name, model, feeds = pickle.loads(read.read(struct.unpack("<Q", header)[0]))
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.intra_op_num_threads = 2
            options.register_custom_ops_library(library)
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            reply = ("ok", session.run(None, feeds))
        except BaseException as error:  # reported to the parent, which judges the type
            kind = type(error).__module__ + "." + type(error).__qualname__
            reply = ("error", kind, str(error))
        data = pickle.dumps(reply)
        write.write(struct.pack("<Q", len(data)) + data)
        write.flush()
    """
)


class WorkerDied(Exception):
    """The worker process ended (signal or exit) or hung while running a case."""


class OrtWorker:
    """A subprocess running cases one after another; restarted after it dies."""

    def __init__(self, library: Path):
        self.library = library
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            [sys.executable, "-c", WORKER_SOURCE, str(self.library)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip

    def _read_exactly(self, count: int) -> bytes:
        chunks, left = [], count
        while left:
            ready, _, _ = select.select([self.process.stdout], [], [], CASE_TIMEOUT_S)
            if not ready:
                self.process.kill()
                self.process.wait()
                raise WorkerDied(f"no answer within {CASE_TIMEOUT_S:.0f} s (hang)")
            chunk = os.read(self.process.stdout.fileno(), left)
            if not chunk:
                code = self.process.wait()
                how = f"signal {-code}" if code < 0 else f"exit status {code}"
                raise WorkerDied(f"worker died ({how})")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def run(self, name: str, model: bytes, feeds: dict[str, np.ndarray]):
        """("ok", outputs) or ("error", class path, message); raises WorkerDied."""
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        data = pickle.dumps((name, model, feeds))
        try:
            self.process.stdin.write(struct.pack("<Q", len(data)) + data)
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # reported by the read below
        try:
            return pickle.loads(self._read_exactly(struct.unpack("<Q", self._read_exactly(8))[0]))
        except WorkerDied:
            self.process = None
            raise

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        self.process = None


# ---- cases ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """A model and its feeds, with what must come out.

    ``reference``: (direction, chunk): the output must equal ``gspn_scan_ref`` of the feeds.
    ``words``: the run must fail with an ONNX Runtime error whose message contains every word.
    """

    name: str
    model: onnx.ModelProto = field(repr=False)
    feeds: dict[str, np.ndarray] = field(repr=False)
    reference: tuple[str, int] | None = None
    words: list[str] = field(default_factory=list)


def raw_attribute(name: str, kind: int, **fields) -> onnx.AttributeProto:
    attribute = onnx.AttributeProto(name=name, type=kind)
    for key, value in fields.items():
        field_value = getattr(attribute, key)
        if hasattr(field_value, "extend"):
            field_value.extend(value)
        else:
            setattr(attribute, key, value)
    return attribute


def attribute_cases() -> list[Case]:
    cases: list[Case] = []
    base, feeds = shape_free_scan_model("t2b", 0), scan_feeds_of(H=9)
    for chunk in (0, 1, 2, 4, 8, 9, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1):
        cases.append(Case(f"chunk={chunk}", with_attributes(base, chunk=chunk), feeds, ("t2b", chunk)))
    for chunk in (-1, -2, -(2**31), -(2**32) + 1, -(2**40), -(2**63)):
        cases.append(Case(f"chunk={chunk}", with_attributes(base, chunk=chunk), feeds, words=["'chunk'", ">= 0", str(chunk)]))
    wrong_chunks = {
        "ints[2]": [2], "ints[0]": [0], "ints[2,3]": [2, 3], "float2.0": 2.0, "float0.0": 0.0,
        "float1.5": 1.5, "floats[2.0]": [2.0], "string'2'": "2", "string''": "", "strings": ["2"],
        "tensor-int64-scalar": numpy_helper.from_array(np.array(2, np.int64)),
        "tensor-int64-[2]": numpy_helper.from_array(np.array([2], np.int64)),
        "tensor-float": numpy_helper.from_array(np.array(2.0, np.float32)),
        "tensor-empty": numpy_helper.from_array(np.zeros(0, np.int64)),
        "empty-ints": raw_attribute("chunk", onnx.AttributeProto.INTS),
        "empty-floats": raw_attribute("chunk", onnx.AttributeProto.FLOATS),
        "graph": helper.make_graph([], "g", [], []),
    }  # fmt: skip
    for what, value in wrong_chunks.items():
        cases.append(Case(f"chunk={what}", with_attributes(base, chunk=value), feeds, words=["'chunk'"]))
    # Malformed attribute protos that ONNX Runtime refuses itself, with its own wording.
    mismatched = raw_attribute("chunk", onnx.AttributeProto.INTS, i=2)
    cases.append(Case("chunk=ints-type-holding-i", with_attributes(base, chunk=mismatched), feeds,
                      words=["INVALID_GRAPH", "attribute chunk"]))  # fmt: skip
    for name in ("chunk", "direction"):
        untyped = onnx.AttributeProto(name=name)
        cases.append(Case(f"{name}=no-type", with_attributes(base, **{name: untyped}), feeds,
                          words=["INVALID_GRAPH", "Field 'type'"]))  # fmt: skip
    # An INT attribute without a value field is the protobuf default, 0 (encoders that skip zero
    # fields write chunk = 0 this way).
    valueless = raw_attribute("chunk", onnx.AttributeProto.INT)
    cases.append(Case("chunk=int-type-without-value", with_attributes(base, chunk=valueless), feeds, ("t2b", 0)))
    cases.append(Case("chunk-missing", with_attributes(base, chunk=None), feeds, ("t2b", 0)))
    for direction in gspn_ref.DIRECTIONS:
        for chunk in (0, 3):
            model = with_attributes(base, direction=direction, chunk=chunk)
            cases.append(Case(f"direction={direction},chunk={chunk}", model, scan_feeds_of(H=9, W=7, direction=direction), (direction, chunk)))
    wrong_directions = {
        "'t2b\\0junk'": "t2b\0junk", "'t2b\\0'": b"t2b\0", "'l2r\\0r2l'": "l2r\0r2l", "'T2B'": "T2B",
        "''": "", "'t2b '": "t2b ", "' t2b'": " t2b", "'t2'": "t2", "'t2bb'": "t2bb", "'up'": "up",
        "'\\xff'": b"\xff", "'\\xff\\xfe'": b"t2b\xff\xfe", "'\\n'": "\n", "long": "t" * 100_000,
        "int1": 1, "int0": 0, "float": 1.0, "ints": [1], "strings[t2b]": ["t2b"],
        "tensor": numpy_helper.from_array(np.frombuffer(b"t2b", np.uint8).copy()),
        "graph": helper.make_graph([], "g", [], []),
    }  # fmt: skip
    for what, value in wrong_directions.items():
        cases.append(Case(f"direction={what}", with_attributes(base, direction=value), feeds, words=["'direction'"]))
    cases.append(Case("direction-missing", with_attributes(base, direction=None), feeds, words=["'direction'", "required"]))
    for name in ("chunk", "direction"):
        model = with_attributes(base)
        model.graph.node[0].attribute.append(helper.make_attribute(name, 3 if name == "chunk" else "b2t"))
        cases.append(Case(f"duplicate-{name}", model, feeds, words=[f"'{name}'"]))
    # An attribute the operator does not define is ignored (ONNX Runtime passes it through).
    cases.append(Case("unknown-attribute", with_attributes(base, chunks=3), feeds, ("t2b", 0)))
    return cases


def structure_cases() -> list[Case]:
    """Wrong input and output counts, omitted inputs, declared element types."""
    cases: list[Case] = []
    feeds = scan_feeds_of()
    for count in (0, 1, 2, 3, 4, 6, 7, 10):
        model = shape_free_scan_model()
        node = model.graph.node[0]
        names = [SCAN_INPUT_NAMES[i % 5] for i in range(count)]
        del node.input[:]
        node.input.extend(names)
        kept = [v for v in model.graph.input if v.name in names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        cases.append(Case(f"{count}-inputs", model, {k: v for k, v in feeds.items() if k in names},
                          words=["GSPNScan", f"input size {count}"]))  # fmt: skip
    for position, name in enumerate(SCAN_INPUT_NAMES):
        model = shape_free_scan_model()
        model.graph.node[0].input[position] = ""
        kept = [v for v in model.graph.input if v.name != name]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        cases.append(Case(f"omitted-{name}", model, {k: v for k, v in feeds.items() if k != name},
                          words=[f"input {position}", "empty"]))  # fmt: skip
    for count in (0, 2):
        model = shape_free_scan_model()
        node = model.graph.node[0]
        del node.output[:]
        del model.graph.output[:]
        for k in range(count):
            node.output.append(f"h{k}")
            model.graph.output.append(helper.make_tensor_value_info(f"h{k}", TensorProto.FLOAT, None))
        words = ["output size 2"] if count else ["output"]
        cases.append(Case(f"{count}-outputs", model, feeds, words=words))
    numpy_of = {TensorProto.DOUBLE: np.float64, TensorProto.INT32: np.int32, TensorProto.INT64: np.int64,
                TensorProto.BFLOAT16: None, TensorProto.UINT8: np.uint8, TensorProto.BOOL: np.bool_}  # fmt: skip
    for elem, dtype in numpy_of.items():
        type_name = TensorProto.DataType.Name(elem).lower()
        if dtype is not None:
            cast = {k: v.astype(dtype) for k, v in feeds.items()}
            cases.append(Case(f"all-{type_name}", shape_free_scan_model(elem=elem), cast, words=["(x)", "GSPNScan"]))
        for position, name in enumerate(SCAN_INPUT_NAMES[1:], start=1):
            model = shape_free_scan_model()
            model.graph.input[position].type.tensor_type.elem_type = elem
            cast = dict(feeds)
            if dtype is not None:
                cast[name] = feeds[name].astype(dtype)
            cases.append(Case(f"declared-{name}-{type_name}", model, cast, words=[f"({name})", "GSPNScan"]))
    for name in SCAN_INPUT_NAMES[1:]:  # with declared shapes, ONNX Runtime's type inference refuses it
        model = export.scan_model("t2b", 0)
        model.graph.input[SCAN_INPUT_NAMES.index(name)].type.tensor_type.elem_type = TensorProto.FLOAT16
        cases.append(Case(f"shaped-declared-{name}-float16", model, {**feeds, name: feeds[name].astype(np.float16)},
                          words=["GSPNScan", "no kernel def matches"]))  # fmt: skip
    for name in SCAN_INPUT_NAMES:  # the model says float32, the feed is something else
        for dtype in (np.float64, np.float16, np.int32):
            cases.append(Case(f"fed-{name}-{np.dtype(dtype).name}", shape_free_scan_model(),
                              {**feeds, name: feeds[name].astype(dtype)}, words=["input data type"]))  # fmt: skip
    half = shape_free_scan_model(elem=TensorProto.FLOAT16)
    cases.append(Case("float16-fed-float32", half, feeds, words=["input data type"]))
    return cases


def shape_cases() -> list[Case]:
    """Wrong ranks, mismatched and zero-size dimensions, for each direction and float type."""
    cases: list[Case] = []
    for direction, elem, dtype in (("t2b", TensorProto.FLOAT, np.float32), ("l2r", TensorProto.FLOAT, np.float32),
                                   ("b2t", TensorProto.FLOAT16, np.float16), ("r2l", TensorProto.FLOAT16, np.float16)):  # fmt: skip
        model, tag = shape_free_scan_model(direction, 2, elem), f"{direction}-{np.dtype(dtype).name}"
        good = scan_feeds_of(dtype=dtype, direction=direction)

        def bad(what, words, **changes):
            cases.append(Case(f"{tag}-{what}", model, {**good, **changes}, words=words))

        for name in SCAN_INPUT_NAMES:
            for rank in (0, 1, 2, 3, 5, 6):
                shape = (good[name].shape + (1, 1))[:rank] if rank <= 6 else ()
                bad(f"{name}-rank{rank}", [f"'{name}'", f"rank {rank}"], **{name: np.ones(shape, dtype)})
        for axis in range(4):
            shape = list(good["lam"].shape)
            shape[axis] += 1
            bad(f"lam-axis{axis}+1", ["'lam'", str(tuple(shape))], lam=np.ones(shape, dtype))
        for name in ("gl", "gm", "gr"):
            for axis in (0, 2, 3):
                shape = list(good[name].shape)
                shape[axis] += 1
                bad(f"{name}-axis{axis}+1", [f"'{name}'", str(tuple(shape))], **{name: np.ones(shape, dtype)})
        bad("gm-groups", ["'gm'", "(2, 1, 5, 6)"], gm=np.ones((2, 1, 5, 6), dtype))
        weights = lambda G: {k: np.ones((2, G, 5, 6), dtype) for k in ("gl", "gm", "gr")}  # noqa: E731
        bad("G-not-dividing-C", ["G = 3", "C = 4", "'gl'"], **weights(3))
        bad("G-greater-than-C", ["G = 8", "C = 4", "'gl'"], **weights(8))
        bad("G=0", ["'gl'", "empty", "(2, 0, 5, 6)"], **weights(0))
        for axis, dim in enumerate("BCHW"):  # SPEC section 2 needs every dimension >= 1, like the reference
            zero = {k: np.ones(tuple(0 if a == axis and (dim != "C" or k in ("x", "lam")) else s
                                     for a, s in enumerate(v.shape)), dtype) for k, v in good.items()}  # fmt: skip
            bad(f"{dim}=0", ["'x'", "empty"], **zero)
        bad("gl-H=0", ["'gl'", "empty"], gl=np.ones((2, 2, 0, 6), dtype))
        bad("all-empty-rank4", ["'x'", "empty"], **{k: np.ones((0, 0, 0, 0), dtype) for k in SCAN_INPUT_NAMES})
    # Values at the edge: an infinite weight on a neighbour outside the line must not leak in
    # (SPEC section 2), NaN in x propagates exactly as in the reference.
    for direction in gspn_ref.DIRECTIONS:
        feeds = scan_feeds_of(direction=direction, H=7, W=8)
        column = gspn_ref.is_column(direction)
        for name, edge in (("gl", 0), ("gr", -1)):
            poisoned = feeds[name].copy()
            if column:
                poisoned[:, :, edge, :] = np.inf
            else:
                poisoned[:, :, :, edge] = np.inf
            cases.append(Case(f"{direction}-inf-{name}-outside-line", shape_free_scan_model(direction, 3),
                              {**feeds, name: poisoned}, (direction, 3)))  # fmt: skip
        nan_x = feeds["x"].copy()
        nan_x[0, 1, 3, 4] = np.nan
        cases.append(Case(f"{direction}-nan-x", shape_free_scan_model(direction, 0), {**feeds, "x": nan_x}, (direction, 0)))
    return cases


def all_cases() -> list[Case]:
    return attribute_cases() + structure_cases() + shape_cases()


# ---- judging -------------------------------------------------------------------------------------

ORT_ERROR_MODULE = "onnxruntime.capi.onnxruntime_pybind11_state."


def reference_output(feeds, direction, chunk) -> np.ndarray:
    tensors = [torch.from_numpy(feeds[name]) for name in SCAN_INPUT_NAMES]
    return gspn_ref.gspn_scan_ref(*tensors, direction=direction, chunk=chunk).numpy()


def judge(case: Case, reply) -> str | None:
    """None when the reply is what the case must yield, else what went wrong."""
    if case.reference is not None:
        if reply[0] != "ok":
            return f"expected the reference result, got {reply[1]}: {reply[2][:300]}"
        (actual,) = reply[1]
        expected = reference_output(case.feeds, *case.reference)
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return f"output {actual.dtype} {actual.shape}, expected {expected.dtype} {expected.shape}"
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        if not np.array_equal(np.isnan(a), np.isnan(e)):
            return "NaN positions differ from the reference"
        finite = ~np.isnan(e)
        n_lines = gspn_ref.line_count(case.reference[0], *e.shape[2:])
        tol = scan_tolerance(torch.float16 if expected.dtype == np.float16 else torch.float32, n_lines)
        scale = max(np.abs(e[finite]).max(initial=0.0), 1e-30)
        worst = np.abs(a[finite] - e[finite]).max(initial=0.0)
        if (np.abs(a[finite] - e[finite]) > tol * (np.abs(e[finite]) + scale)).any():
            return f"differs from the reference: max |diff| {worst:.3e}, scale {scale:.3e}"
        return None
    if reply[0] != "error":
        return f"expected an error naming {case.words}, got a result"
    kind, message = reply[1], reply[2]
    if not kind.startswith(ORT_ERROR_MODULE):
        return f"expected an ONNX Runtime error, got {kind}: {message[:300]}"
    missing = [word for word in case.words if word not in message]
    if missing:
        return f"error message lacks {missing}: {message[:400]}"
    return None


def run_cases(worker: OrtWorker, cases: list[Case]) -> dict[str, list[str]]:
    """Runs every case; returns the failures grouped: 'crashed' (signal, exit, hang) and 'wrong'."""
    failures: dict[str, list[str]] = {"crashed": [], "wrong": []}
    for case in cases:
        try:
            reply = worker.run(case.name, case.model.SerializeToString(), case.feeds)
        except WorkerDied as died:
            failures["crashed"].append(f"{case.name}: {died}")
            continue
        problem = judge(case, reply)
        if problem:
            failures["wrong"].append(f"{case.name}: {problem}")
    return failures


@pytest.fixture(scope="module")
def worker():
    ort_worker = OrtWorker(export.library_path())
    yield ort_worker
    ort_worker.close()


def test_enumerated_malformed_models_and_feeds(worker):
    cases = all_cases()
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    failures = run_cases(worker, cases)
    print(f"{len(cases)} cases: {len(failures['crashed'])} crashed, {len(failures['wrong'])} wrong")
    assert not failures["crashed"] and not failures["wrong"], "\n".join(failures["crashed"] + failures["wrong"])


# ---- Hypothesis over shapes ----------------------------------------------------------------------

CHUNKS = st.one_of(st.integers(0, 12), st.sampled_from([2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**63 - 1]))


@st.composite
def valid_cases(draw):
    G = draw(st.integers(1, 3))
    C = G * draw(st.integers(1, 3))
    B, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 19)), draw(st.integers(1, 35))
    direction = draw(st.sampled_from(gspn_ref.DIRECTIONS))
    chunk = draw(CHUNKS)
    half = draw(st.booleans())
    feeds = scan_feeds_of(B, C, G, H, W, np.float16 if half else np.float32, seed=draw(st.integers(0, 3)), direction=direction)
    model = shape_free_scan_model(direction, chunk, TensorProto.FLOAT16 if half else TensorProto.FLOAT)
    return Case(f"valid {(B, C, G, H, W)} {direction} chunk={chunk} half={half}", model, feeds, (direction, chunk))


@st.composite
def mutated_cases(draw):
    """A valid shape with one input's shape changed (one dimension resized, or a rank change)."""
    G = draw(st.integers(1, 3))
    B, C, H, W = draw(st.integers(1, 2)), G * draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    feeds = scan_feeds_of(B, C, G, H, W)
    name = draw(st.sampled_from(SCAN_INPUT_NAMES))
    shape = list(feeds[name].shape)
    if draw(st.booleans()):
        axis = draw(st.integers(0, 3))
        new_size = draw(st.integers(0, 2 * shape[axis] + 2).filter(lambda n: n != shape[axis]))
        shape[axis] = new_size
    else:
        shape = draw(st.sampled_from([shape[:3], shape[1:], shape + [1], [1] + shape, []]))
    feeds[name] = np.ones(shape, np.float32)
    direction = draw(st.sampled_from(gspn_ref.DIRECTIONS))
    return Case(f"{name} shape {tuple(shape)} for {(B, C, G, H, W)} {direction}", shape_free_scan_model(direction, 2), feeds,
                words=[f"'{name}'", "GSPNScan"])  # fmt: skip


def run_one(worker: OrtWorker, case: Case) -> None:
    try:
        reply = worker.run(case.name, case.model.SerializeToString(), case.feeds)
    except WorkerDied as died:
        pytest.fail(f"{case.name}: {died}")
    problem = judge(case, reply)
    assert problem is None, f"{case.name}: {problem}"


@settings(max_examples=40)
@given(case=valid_cases())
def test_valid_shapes_match_the_reference(worker, case):
    run_one(worker, case)


@settings(max_examples=40)
@given(case=mutated_cases())
def test_mutated_shapes_are_errors_naming_the_input(worker, case):
    run_one(worker, case)


# ---- element counts beyond 2**31 -----------------------------------------------------------------

LARGE_SOURCE = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    sys.path[:0] = [{root!r}]
    import export
    direction = sys.argv[1]
    # x: (1, C, 256, 256) float16 with C = 2**15 + 1: 2**31 + 2**16 elements, the last plane at
    # element offset exactly 2**31. Zeros from np.zeros are untouched pages (no memory); only the
    # output is written in full. G = 1: the weights are one small plane.
    C, H, W = 2**15 + 1, 256, 256
    x = np.zeros((1, C, H, W), np.float16)
    lam = np.zeros(x.shape, np.float16)  # not zeros_like, which writes every page
    x[0, -1], lam[0, -1] = 1, 1    # the plane past 2**31
    x[0, 0], lam[0, 0] = 2, 1      # where it would land with 32-bit offsets
    gl, gm, gr = (np.zeros((1, 1, H, W), np.float16) for _ in range(3))
    gm[:] = 1                       # h_s = h_(s-1) + lam x: line s holds (s + 1) * x
    model = export.scan_model(direction, 0, "float16")
    session = export.session(model, intra_op_num_threads=2)
    (h,) = session.run(None, dict(x=x, lam=lam, gl=gl, gm=gm, gr=gr))
    s = np.arange(1, (H if direction in ("t2b", "b2t") else W) + 1, dtype=np.float16)
    s = s[::-1] if direction in ("b2t", "r2l") else s
    line = s[:, None] if direction in ("t2b", "b2t") else s[None, :]
    assert h.shape == x.shape, h.shape
    assert np.array_equal(h[0, -1], np.broadcast_to(line, (H, W))), "plane past 2**31 is wrong"
    assert np.array_equal(h[0, 0], np.broadcast_to(2 * line, (H, W))), "plane 0 is wrong"
    assert not h[0, 1:-1:997].any(), "a zero plane is not zero"
    print("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)

# The output alone is 2**31 float16 elements (4.3 GB). Inputs are read where numpy put them (no
# copy), so the peak stays near 4.6 GB plus the interpreter.
LARGE_PEAK_BOUND_BYTES = 6 * 2**30


def test_element_count_beyond_2_31_uses_64_bit_offsets():
    # One row scan through ONNX Runtime (about 9 s on 2 cores); column scans at offsets beyond
    # 2**31 are checked at no memory cost by the C++ kernel test (tests/test_ortops_cpp.py).
    direction = "t2b"
    script = LARGE_SOURCE.format(root=str(Path(__file__).resolve().parents[2]))
    result = subprocess.run([sys.executable, "-c", script, direction], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    peak = int(result.stdout.split("peak_rss_bytes")[1].split()[0])
    print(f"{direction}: peak RSS {peak / 2**30:.2f} GiB")
    assert peak < LARGE_PEAK_BOUND_BYTES, f"peak RSS {peak / 2**30:.2f} GiB"


# ---- script: counts for the README ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=None, help="library to fuzz (default: build it)")
    args = parser.parse_args(argv)
    library = args.library or export.library_path()
    cases = all_cases()
    worker = OrtWorker(library)
    failures = run_cases(worker, cases)
    worker.close()
    for line in failures["crashed"] + failures["wrong"]:
        print(line)
    print(f"{library}: {len(cases)} malformed or edge cases: {len(failures['crashed'])} crashed, "
          f"{len(failures['wrong'])} wrong (silent wrong answer, or not a clear ONNX Runtime error)")  # fmt: skip
    return 1 if failures["crashed"] or failures["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
