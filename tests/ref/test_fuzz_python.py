"""Fuzz the Python boundary of the scan the way a hostile user would (issue 8, part 2).

Entry points: ``gspn_ref.gspn_scan``, ``torch.ops.gspn.scan`` / ``scan_backward`` called directly,
``gspn_scan_ref`` / ``gspn_scan_backward_ref``, the TVM kernels (``gspn_tvm.kernels``, and the
operator with ``gspn_tvm.enable()``) and the ``GSPN`` layer. Each case is one *mutation* of a valid
call: zero-size dimensions, wrong ranks, shapes, dtypes (integer, bool, complex, mixed), devices
(meta), non-tensors, sparse layouts, bad ``direction``/``chunk`` values, and valid-but-unusual
inputs (non-contiguous, stride-0 expanded, channels-last, aliased arguments, NaN/inf, huge chunk).

The outcome of every case is one of: the correct result (compared with the reference run on clean
contiguous copies), or a ``ValueError``/``TypeError`` whose message starts with the name of the
offending argument. Arguments of the wrong Python type for the operator's schema are rejected by
torch's dispatcher before any kernel runs; its ``RuntimeError`` names the argument and is accepted
for the ``torch.ops`` entry points only. Anything else fails: another exception, a result where an
error was due, a wrong result, or a crash.

Cases run in subprocesses (a crash must not take pytest down): the runner prints a line before and
after each case, so a process killed by a signal names the case it was running; the remaining cases
run in a fresh process. ``python tests/test_fuzz_python.py --report`` prints the tally per outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parents[1]  # tests/: helpers.py
ROOT = HERE.parent

ENTRIES = ("gspn_scan", "op", "op_backward", "ref", "ref_backward", "tvm_forward", "tvm_backward", "layer")
BACKENDS = ("ref", "tvm")  # kernels behind torch.ops.gspn.* (and so gspn_scan and the layer)
OP_ENTRIES = ("op", "op_backward")
BACKWARD_ENTRIES = ("op_backward", "ref_backward", "tvm_backward")
TVM_ENTRIES = ("tvm_forward", "tvm_backward")

#: mutation -> argument its error must name; None: the call is valid and must give the right result.
INVALID = {
    "rank3_x": "x",
    "rank5_gl": "gl",
    "zero_B": "x",
    "zero_C": "x",
    "zero_H": "x",
    "zero_W": "x",
    "zero_G": "gl",
    "G_greater_than_C": "gl",
    "G_not_dividing_C": "gl",
    "lam_wrong_shape": "lam",
    "gm_wrong_width": "gm",
    "gr_wrong_batch": "gr",
    "int32_x": "x",
    "int64_gl": "gl",
    "bool_lam": "lam",
    "uint8_gr": "gr",
    "complex_x": "x",
    "float64_lam_with_float32_x": "lam",
    "meta_lam": "lam",
    "list_x": "x",
    "numpy_gm": "gm",
    "none_gr": "gr",
    "sparse_x": "x",
    "direction_nul_junk": "direction",
    "direction_upper": "direction",
    "direction_int": "direction",
    "direction_none": "direction",
    "chunk_negative": "chunk",
    "chunk_2_pow_63": "chunk",
    "chunk_2_pow_64": "chunk",
    "chunk_float": "chunk",
    "chunk_str": "chunk",
    "chunk_tensor": "chunk",
    "gh_wrong_shape": "gh",
    "gh_wrong_dtype": "gh",
    "h_wrong_shape": "h",
}
VALID = (
    "plain",
    "non_contiguous",
    "expanded_stride0",
    "channels_last",
    "alias_x_lam",
    "alias_weights",
    "nan_inf_values",
    "inf_out_of_line_weights",
    "chunk_2_pow_32_plus_1",
    "chunk_numpy_int",
    "requires_grad",
    "meta_all",
    "meta_beyond_2_pow_31",
)
MUTATIONS = tuple(INVALID) + VALID
BACKWARD_ONLY = ("gh_wrong_shape", "gh_wrong_dtype", "h_wrong_shape")
LAYER_MUTATIONS = ("plain", "non_contiguous", "channels_last", "nan_inf_values", "expanded_stride0")
#: Malformed layer inputs that ``GSPN.forward`` does not check yet: torch's convolution raises a
#: RuntimeError that does not name ``x`` (gspn_ref/layer.py needs a ``validate`` of ``x`` first).
LAYER_UNCHECKED = ("rank3_x", "zero_H", "int32_x", "meta_all")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def applies(entry: str, mutation: str) -> bool:
    if mutation in BACKWARD_ONLY:
        return entry in BACKWARD_ENTRIES
    if entry == "layer":
        return mutation in LAYER_MUTATIONS
    return not mutation.startswith("__")


def catalogue() -> list[dict]:
    """Every applicable (entry, backend, mutation), one shape and dtype each (deterministic)."""
    cases = []
    for entry in ENTRIES:
        backends = ("tvm",) if entry in TVM_ENTRIES else ("ref",) if entry.startswith("ref") else BACKENDS
        for backend in backends:
            for k, mutation in enumerate(MUTATIONS):
                if applies(entry, mutation):
                    cases.append(
                        {"entry": entry, "backend": backend, "mutation": mutation, "dtype": DTYPES[k % 3],
                         "shape": [2, 4, 2, 5, 6], "direction": ("t2b", "b2t", "l2r", "r2l")[k % 4],
                         "chunk": k % 3, "seed": k}
                    )
    return cases


@st.composite
def fuzz_cases(draw):
    """A random case: any entry and mutation, on a random shape, dtype, direction and chunk."""
    entry = draw(st.sampled_from(ENTRIES))
    mutation = draw(st.sampled_from([m for m in MUTATIONS if applies(entry, m)]))
    G = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 2)), G * draw(st.integers(1, 3)), G, draw(st.integers(1, 9)), draw(st.integers(1, 9))]
    backend = "tvm" if entry in TVM_ENTRIES else "ref" if entry.startswith("ref") else draw(st.sampled_from(BACKENDS))
    return {
        "entry": entry, "backend": backend, "mutation": mutation, "dtype": draw(st.sampled_from(DTYPES)),
        "shape": shape, "direction": draw(st.sampled_from(("t2b", "b2t", "l2r", "r2l"))),
        "chunk": draw(st.integers(0, 10)), "seed": draw(st.integers(0, 2**16)),
    }


def describe(case: dict) -> str:
    return "{entry}[{backend}] {mutation} dtype={dtype} shape={shape} {direction} chunk={chunk} seed={seed}".format(**case)


# -- running cases in subprocesses ----------------------------------------------------------------


def run_cases(cases: list[dict], timeout: float = 300) -> list[dict]:
    """Outcome of every case: ``{"case", "status", "detail"}``; status ``ok``, ``fail`` (wrong
    result or unclear error), ``crash`` (the process was killed by a signal) or ``uncaught`` (an
    exception other than ValueError/TypeError/RuntimeError ended the process).

    The case a dead process was running is marked, and the remaining cases run in a new process.
    """
    results: list[dict] = []
    pending = list(cases)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    while pending:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--run"],
            input=json.dumps(pending), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
        )
        started = None
        done = 0
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("RESULT "):
                record = json.loads(line[len("RESULT "):])
                results.append({"case": pending[record["index"]], "status": record["status"], "detail": record["detail"]})
                done = record["index"] + 1
                started = None
        if proc.returncode == 0 and done == len(pending):
            break
        crashed = started if started is not None else done
        signal = -proc.returncode if proc.returncode < 0 else None
        detail = f"process died (signal {signal})" if signal else f"process exited with {proc.returncode}"
        status = "crash" if signal else "uncaught"
        results.append({"case": pending[crashed], "status": status, "detail": f"{detail}: {proc.stderr[-400:]}"})
        pending = pending[crashed + 1:]
    return results


def classify(result: dict) -> str:
    """``ok``, ``crash``, ``uncaught``, ``silent_wrong`` (a result where an error was due, or a wrong
    result) or ``unclear_error`` (an error of the wrong type or that does not name the argument)."""
    if result["status"] != "fail":
        return result["status"]
    detail = result["detail"]
    wrong = detail.startswith(("returned a result", "max |diff|", "NaN positions", "infinite values", "shape/dtype", "meta result"))
    return "silent_wrong" if wrong else "unclear_error"


def _failures(results: list[dict]) -> list[str]:
    return [f"{r['status']}: {describe(r['case'])}: {r['detail']}" for r in results if r["status"] != "ok"]


def test_catalogue_of_malformed_inputs():
    """Every mutation at every entry point: correct result or a clear error; no crash."""
    cases = catalogue()
    results = run_cases(cases)
    assert len(results) == len(cases)
    failures = _failures(results)
    print(f"{len(cases)} cases, {len(failures)} failures")
    assert not failures, "\n".join(failures)


@settings(max_examples=2, deadline=None)
@given(cases=st.lists(fuzz_cases(), min_size=40, max_size=40))
def test_random_malformed_inputs(cases):
    results = run_cases(cases)
    failures = _failures(results)
    assert not failures, "\n".join(failures)


def test_layer_rejects_malformed_input_with_a_named_error():
    base = catalogue()[0]
    cases = [dict(base, entry="layer", backend=b, mutation=m) for m in LAYER_UNCHECKED for b in BACKENDS]
    failures = _failures(run_cases(cases))
    assert not failures, "\n".join(failures)


def test_runner_reports_a_crash_and_names_the_case():
    """The harness itself: a case that kills its process is reported as a crash, by name, and the
    cases after it still run."""
    cases = [dict(catalogue()[0], mutation="plain"), dict(catalogue()[0], mutation="__segfault__"),
             dict(catalogue()[0], mutation="plain")]
    results = run_cases(cases)
    assert [r["status"] for r in results] == ["ok", "crash", "ok"]
    assert "signal 11" in results[1]["detail"] and results[1]["case"]["mutation"] == "__segfault__"


# -- the case runner (executed in the subprocess) -------------------------------------------------


def _build(case: dict):
    """``(call, expected_argument)``: a zero-argument callable and the argument its error must name
    (None when the call is valid); the callable returns ``(result, oracle)`` for valid calls."""
    import numpy as np
    import torch

    import gspn_ref
    from helpers import make_scan_inputs

    mutation, entry = case["mutation"], case["entry"]
    B, C, G, H, W = case["shape"]
    direction, chunk, dtype = case["direction"], case["chunk"], getattr(torch, case["dtype"])
    backward = entry in BACKWARD_ENTRIES
    if mutation == "meta_beyond_2_pow_31":
        B, C, G, H, W = 1, 2**21, 1, 32, 33  # 33 * 2**26 > 2**31 elements, nothing allocated
    if mutation == "G_greater_than_C":
        C, G = 1, 2
    if mutation == "G_not_dividing_C":
        C, G = 3, 2
    if mutation.startswith("zero_"):
        dim = mutation[-1]
        B, C, G, H, W = (0 if d == dim or (dim == "C" and d == "G") else v for d, v in zip("BCGHW", (B, C, G, H, W)))
    n = lambda shape: [max(v, 1) for v in shape]  # noqa: E731
    base = make_scan_inputs(*n([B, C, G, H, W]), dtype, seed=case["seed"], direction=direction) if mutation != "meta_beyond_2_pow_31" else None
    if base is None:
        x, lam, gl, gm, gr = (torch.empty(s, dtype=dtype, device="meta") for s in ([B, C, H, W],) * 2 + ([B, G, H, W],) * 3)
    else:
        x, lam, gl, gm, gr = (t[:B, :C if i < 2 else G, :H, :W] for i, t in enumerate(base))
    args = {"x": x, "lam": lam, "gl": gl, "gm": gm, "gr": gr, "direction": direction, "chunk": chunk}
    clean = {k: (v.detach().contiguous().clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    gen = torch.Generator().manual_seed(case["seed"] + 7)
    gh = torch.randn(x.shape, generator=gen).to(dtype) if x.device.type != "meta" else torch.empty_like(x)
    h = None

    def set_weights(fn):
        for k in ("gl", "gm", "gr"):
            args[k] = fn(args[k])

    if mutation == "rank3_x":
        args["x"] = x[0]
    elif mutation == "rank5_gl":
        args["gl"] = gl.unsqueeze(0)
    elif mutation == "lam_wrong_shape":
        args["lam"] = torch.zeros(B, C, H + 1, W, dtype=dtype)
    elif mutation == "gm_wrong_width":
        args["gm"] = torch.zeros(B, G, H, W + 1, dtype=dtype)
    elif mutation == "gr_wrong_batch":
        args["gr"] = torch.zeros(B + 1, G, H, W, dtype=dtype)
    elif mutation == "int32_x":
        args["x"] = x.to(torch.int32)
    elif mutation == "int64_gl":
        args["gl"] = gl.to(torch.int64)
    elif mutation == "bool_lam":
        args["lam"] = lam > 0
    elif mutation == "uint8_gr":
        args["gr"] = gr.to(torch.uint8)
    elif mutation == "complex_x":
        args["x"] = x.to(torch.complex64)
    elif mutation == "float64_lam_with_float32_x":
        args["x"], args["lam"] = x.float(), lam.double()
        set_weights(lambda t: t.float())
    elif mutation == "meta_lam":
        args["lam"] = lam.to("meta")
    elif mutation == "list_x":
        args["x"] = x.tolist()
    elif mutation == "numpy_gm":
        args["gm"] = gm.float().numpy()
    elif mutation == "none_gr":
        args["gr"] = None
    elif mutation == "sparse_x":
        args["x"] = x.to_sparse()
    elif mutation == "direction_nul_junk":
        args["direction"] = direction + "\0junk"
    elif mutation == "direction_upper":
        args["direction"] = direction.upper()
    elif mutation == "direction_int":
        args["direction"] = 3
    elif mutation == "direction_none":
        args["direction"] = None
    elif mutation == "chunk_negative":
        args["chunk"] = -1
    elif mutation == "chunk_2_pow_63":
        args["chunk"] = 2**63
    elif mutation == "chunk_2_pow_64":
        args["chunk"] = 2**64 + 1
    elif mutation == "chunk_float":
        args["chunk"] = 1.5
    elif mutation == "chunk_str":
        args["chunk"] = "3"
    elif mutation == "chunk_tensor":
        args["chunk"] = torch.tensor(2)
    elif mutation == "gh_wrong_shape":
        gh = gh[:, :, :, :-1] if W > 1 else torch.zeros(B, C, H, W + 1, dtype=dtype)
    elif mutation == "gh_wrong_dtype":
        gh = gh.double() if dtype != torch.float64 else gh.float()
    elif mutation == "h_wrong_shape":
        h = torch.zeros(B, C, H + 1, W, dtype=dtype)
    elif mutation == "non_contiguous":
        for k in ("x", "lam", "gl", "gm", "gr"):
            args[k] = args[k].transpose(2, 3).contiguous().transpose(2, 3)
    elif mutation == "expanded_stride0":
        args["x"] = x[:, :1].expand(B, C, H, W)
        args["gl"] = gl[:, :, :1].expand(B, G, H, W)
        args["lam"] = lam[:1].expand(B, C, H, W)
        clean.update(x=args["x"].contiguous(), gl=args["gl"].contiguous(), lam=args["lam"].contiguous())
    elif mutation == "channels_last":
        for k in ("x", "lam", "gl", "gm", "gr"):
            args[k] = args[k].contiguous(memory_format=torch.channels_last)
    elif mutation == "alias_x_lam":
        args["lam"] = args["x"]
        clean["lam"] = clean["x"]
    elif mutation == "alias_weights":
        args["gm"] = args["gr"] = args["gl"]
        clean["gm"] = clean["gr"] = clean["gl"]
    elif mutation == "nan_inf_values":
        xv = x.clone()
        xv.view(-1)[0] = float("nan")
        xv.view(-1)[-1] = float("inf")
        args["x"] = xv
        clean["x"] = xv.clone()
    elif mutation == "inf_out_of_line_weights":
        # SPEC section 2: a term whose neighbour is outside the line is zero whatever its weight holds
        p_axis = 2 if direction in ("l2r", "r2l") else 3
        wl, wr = gl.clone(), gr.clone()
        wl.select(p_axis, 0).fill_(float("inf"))
        wr.select(p_axis, -1).fill_(float("nan"))
        args["gl"], args["gr"] = wl, wr
        zl, zr = gl.clone(), gr.clone()
        zl.select(p_axis, 0).zero_()
        zr.select(p_axis, -1).zero_()
        clean["gl"], clean["gr"] = zl, zr  # the oracle: the same weights, zero where out of line
    elif mutation == "chunk_2_pow_32_plus_1":
        args["chunk"] = 2**32 + 1
        clean["chunk"] = 0  # larger than any line count: one segment, like chunk = 0
    elif mutation == "chunk_numpy_int":
        args["chunk"] = np.int64(2)
        clean["chunk"] = 2
    elif mutation == "requires_grad":
        for k in ("x", "lam", "gl", "gm", "gr"):
            args[k] = args[k].detach().clone().requires_grad_()
    elif mutation in ("meta_all", "meta_beyond_2_pow_31"):
        for k in ("x", "lam", "gl", "gm", "gr"):
            args[k] = args[k].to("meta")
        clean = dict(args)  # the oracle runs on meta too: only shapes and dtypes are compared
        gh = torch.empty(args["x"].shape, dtype=dtype, device="meta")
    elif mutation == "__segfault__":
        import ctypes

        return (lambda: ctypes.string_at(0)), None
    expected = INVALID.get(mutation)
    if mutation in ("meta_all", "meta_beyond_2_pow_31") and entry in TVM_ENTRIES:
        expected = "x"  # TVM runs on cpu/cuda only: a clear rejection
    if mutation == "chunk_tensor" and entry in OP_ENTRIES:
        expected, clean["chunk"] = None, 2  # the schema's int converts a 0-d integer tensor, exactly
    if entry == "layer" and mutation in LAYER_UNCHECKED:
        expected = "x"
    return _call(entry, args, clean, gh, h), expected


def _call(entry, args, clean, gh, h):
    import torch

    import gspn_ref
    from gspn_tvm import kernels

    names = ("x", "lam", "gl", "gm", "gr", "direction", "chunk")
    a = [args[k] for k in names]
    c = [clean[k] for k in names]

    def oracle_forward():
        return gspn_ref.gspn_scan_ref(*c)

    def oracle_backward():
        return gspn_ref.gspn_scan_backward_ref(gh, *c[:5], gspn_ref.gspn_scan_ref(*c), *c[5:])

    def forward_h():
        if h is not None:
            return h
        tensors = a[:5]
        if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
            try:
                return gspn_ref.gspn_scan_ref(*[t.detach() for t in tensors], *c[5:])
            except (ValueError, TypeError):
                pass
        return torch.zeros_like(gh)

    if entry == "gspn_scan":
        return lambda: (gspn_ref.gspn_scan(*a), oracle_forward())
    if entry == "op":
        return lambda: (torch.ops.gspn.scan(*a), oracle_forward())
    if entry == "ref":
        return lambda: (gspn_ref.gspn_scan_ref(*a), oracle_forward())
    if entry == "tvm_forward":
        return lambda: (kernels.scan_forward(*a), oracle_forward())
    if entry == "op_backward":
        return lambda: (torch.ops.gspn.scan_backward(gh, *a[:5], forward_h(), *a[5:]), oracle_backward())
    if entry == "ref_backward":
        return lambda: (gspn_ref.gspn_scan_backward_ref(gh, *a[:5], forward_h(), *a[5:]), oracle_backward())
    if entry == "tvm_backward":
        return lambda: (kernels.scan_backward(gh, *a[:5], forward_h(), *a[5:]), oracle_backward())
    if entry == "layer":
        x = a[0]
        dim = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 4
        torch.manual_seed(0)
        layer = gspn_ref.GSPN(max(dim, 1), chunk=2).eval()
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            layer = layer.to(dtype=x.dtype if x.dtype != torch.bfloat16 else torch.float32)

        def run_layer():
            with torch.no_grad():
                got = layer(x if x.dtype != torch.bfloat16 else x.float())
                want = layer(c[0].float() if c[0].dtype == torch.bfloat16 else c[0]) if c[0].device.type != "meta" else None
            return got, want

        return run_layer
    raise AssertionError(entry)


def _compare(got, want, dtype_name, case) -> str | None:
    """None when ``got`` matches ``want`` (NaN where ``want`` is NaN), else a message."""
    import torch

    from helpers import scan_tolerance

    gots = got if isinstance(got, tuple) else (got,)
    wants = want if isinstance(want, tuple) else (want,)
    if len(gots) != len(wants):
        return f"{len(gots)} outputs, expected {len(wants)}"
    for g, w in zip(gots, wants):
        if not isinstance(g, torch.Tensor):
            return f"result is {type(g).__name__}, not a tensor"
        if w is None or w.device.type == "meta" or g.device.type == "meta":
            w_shape = g.shape if w is None else w.shape
            if g.shape != w_shape or g.device.type != "meta" or (w is not None and g.dtype != w.dtype):
                return f"meta result {tuple(g.shape)} {g.dtype} on {g.device}, expected {tuple(w_shape)} on meta"
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"shape/dtype {tuple(g.shape)} {g.dtype}, expected {tuple(w.shape)} {w.dtype}"
        g64, w64 = g.detach().double(), w.detach().double()
        if not torch.equal(torch.isnan(g64), torch.isnan(w64)):
            return "NaN positions differ"
        finite = torch.isfinite(w64)
        if not torch.equal(g64[~finite & ~torch.isnan(w64)], w64[~finite & ~torch.isnan(w64)]):
            return "infinite values differ"
        n_terms = (case["shape"][3] + case["shape"][4]) * max(case["shape"][1], 1) * 4
        tol = scan_tolerance(getattr(torch, dtype_name), n_terms)
        scale = w64[finite].abs().max().item() if finite.any() else 0.0
        err = (g64 - w64)[finite].abs()
        if err.numel() and (err > tol * (w64[finite].abs() + scale)).any():
            return f"max |diff| {err.max().item():.3e} > tolerance {tol:.1e} x scale {scale:.3e}"
    return None


def _run_one(case: dict) -> tuple[str, str]:
    import numpy  # noqa: F401  (imported before any case, so a failing import is not a case result)
    import torch

    import gspn_tvm

    if case["backend"] == "tvm" or case["entry"] in TVM_ENTRIES:
        gspn_tvm.enable()
    else:
        gspn_tvm.disable()
    call, expected = _build(case)
    try:
        got, want = call()
    except (ValueError, TypeError) as error:
        message = str(error)
        if expected is None:
            return "fail", f"unexpected {type(error).__name__}: {message[:200]}"
        if not message.startswith(f"{expected}:"):
            return "fail", f"{type(error).__name__} does not name {expected!r} first: {message[:200]}"
        return "ok", f"{type(error).__name__}: {message[:120]}"
    except RuntimeError as error:
        message = str(error)
        dispatcher = f"for argument '{expected}'" in message or (expected == "chunk" and "value cannot be converted" in message)
        if case["entry"] in OP_ENTRIES and expected is not None and dispatcher:
            return "ok", f"dispatcher RuntimeError: {message.splitlines()[0][:120]}"
        return "fail", f"RuntimeError (expected {'a result' if expected is None else 'ValueError/TypeError naming ' + expected}): {message[:200]}"
    if expected is not None:
        return "fail", f"returned a result; expected an error naming {expected!r}"
    problem = _compare(got, want, case["dtype"], case)
    del torch
    return ("fail", problem) if problem else ("ok", "correct result")


def _main_run() -> None:
    import torch  # noqa: F401

    import gspn_tvm  # noqa: F401

    cases = json.loads(sys.stdin.read())
    for index, case in enumerate(cases):
        print(f"START {index}", flush=True)
        status, detail = _run_one(case)
        print("RESULT " + json.dumps({"index": index, "status": status, "detail": detail}), flush=True)


def _main_report() -> None:
    """Tally of the catalogue and 100 random cases: ok / fail / crash, per entry point."""
    import random

    from hypothesis import HealthCheck
    from hypothesis import settings as hsettings

    cases = catalogue()
    random_cases = []

    @hsettings(max_examples=100, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(fuzz_cases())
    def collect(case):
        random_cases.append(case)

    collect()
    random.Random(0).shuffle(random_cases)
    results = run_cases(cases + random_cases, timeout=1800)
    tally: dict[str, int] = {}
    for r in results:
        tally[classify(r)] = tally.get(classify(r), 0) + 1
    for r in results:
        if r["status"] != "ok":
            print(f"{classify(r)}: {describe(r['case'])}: {r['detail'][:300]}")
    print(json.dumps({"cases": len(results), **tally}))


if __name__ == "__main__":
    if "--run" in sys.argv:
        _main_run()
    elif "--report" in sys.argv:
        _main_report()
