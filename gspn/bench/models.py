"""Layers and whole networks per backend: latency, the scan's share of it, peak resident memory.

``prepare_s`` is the time from the torch model to a runnable backend (ONNX export and session
creation; torch.export and Relax compilation). Backends, all on the same model (random weights, seed 0) and the same input, float32, forward:

    torch-reference   torch eager, the reference scan kernels
    torch-tvm         torch eager, the TVM kernels registered on gspn::scan
    ort-custom        ONNX Runtime with the gspn custom operator
    ort-portable      ONNX Runtime, the portable (standard-operator) export
    tvm-relax         the whole model compiled by TVM Relax (``gspn_tvm.compile_model``)

The scan's share of a backend's time is measured: for the torch and ONNX Runtime backends every
``gspn.scan`` and ``gspn.fused_scan`` call of one forward pass is recorded (inputs, direction,
chunk), then the same calls are timed alone with that backend's kernel (ONNX Runtime: one-node
models) and summed; for TVM Relax, whose scan kernels differ from the eager ones (logits read in
place, projections computed inside), the time spent in the compiled program's own scan kernels is
summed over whole runs with the Relax VM's instrument hook (:func:`relax_scan_seconds`). Peak resident memory is the
high-water mark (``VmHWM``) of a fresh process that loads the backend's model and runs it three times.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import export
import gspn_tvm
from gspn_ref import GSPN, GSPNBlock, TinyGSPNClassifier, gspn_fused_scan, gspn_fused_scan_ref, gspn_scan, gspn_scan_ref

from .core import median_seconds, row

BACKENDS = ("torch-reference", "torch-tvm", "ort-custom", "ort-portable", "tvm-relax")
COLUMNS = ["case", "backend", "ms", "speedup", "scan_ms", "scan_share", "peak_rss_MB"]


def _gspn_t() -> torch.nn.Module:
    from gspn_ref.models import gspn_tiny

    return gspn_tiny(num_classes=1000)


#: name -> (builder, input shape). Builders are called after ``torch.manual_seed(0)``.
CASES: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
    "GSPN(96) 1x96x56x56": (lambda: GSPN(96), (1, 96, 56, 56)),
    "GSPNBlock(32) 1x32x112x112": (lambda: GSPNBlock(32), (1, 32, 112, 112)),
    "TinyGSPNClassifier 1x3x224x224": (lambda: TinyGSPNClassifier(), (1, 3, 224, 224)),
    "GSPN-T 1x3x224x224": (_gspn_t, (1, 3, 224, 224)),
    "GSPN-T 8x3x224x224": (_gspn_t, (8, 3, 224, 224)),
}
QUICK_CASES = ("GSPN(96) 1x96x56x56", "GSPN-T 1x3x224x224")
#: Cases whose peak memory is measured (one process per backend).
PEAK_MEMORY_CASES = ("GSPN-T 8x3x224x224",)


def build_case(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    builder, shape = CASES[name]
    torch.manual_seed(0)
    model = builder().eval()
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(1))


#: The operators whose calls count as "the scan", by the name ``record_scans`` gives them.
SCAN_OPS = {"scan": torch.ops.gspn.scan.default, "fused_scan": torch.ops.gspn.fused_scan.default}
_KERNELS = {  # name: (reference, operator, one-node ONNX model, its feeds)
    "scan": (gspn_scan_ref, gspn_scan, export.scan_model, export.scan_feeds),
    "fused_scan": (gspn_fused_scan_ref, gspn_fused_scan, export.fused_scan_model, export.fused_scan_feeds),
}


class _ScanRecorder(TorchDispatchMode):
    """Records the arguments of every ``gspn.scan`` / ``gspn.fused_scan`` call made while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for name, op in SCAN_OPS.items():
            if func is op:
                self.calls.append((name, *(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
        return func(*args, **(kwargs or {}))


def record_scans(model: torch.nn.Module, x: torch.Tensor) -> list[tuple]:
    """``(op, *args)`` of every scan one forward pass of ``model`` makes: ``op`` is ``"scan"`` (args
    ``x, lam, gl, gm, gr, direction, chunk``) or ``"fused_scan"`` (``u, lam, al, am, ar, gate,
    skip, direction, chunk``)."""
    recorder = _ScanRecorder()
    with torch.no_grad(), recorder:
        model(x)
    return recorder.calls


def _scan_runners(backend: str, calls: list[tuple]) -> list[Callable[[], object]]:
    """One callable per recorded scan that runs it with ``backend``'s scan kernel."""
    if backend == "torch-reference":
        return [lambda c=c: _KERNELS[c[0]][0](*c[1:]) for c in calls]
    if backend == "torch-tvm":
        return [lambda c=c: _KERNELS[c[0]][1](*c[1:]) for c in calls]
    if backend not in ("ort-custom", "ort-portable"):
        raise ValueError(f"backend: recorded scans run with torch or ONNX Runtime kernels; got {backend!r} "
                         "(TVM Relax: relax_scan_seconds)")  # fmt: skip
    threads = torch.get_num_threads()
    runners = []
    for op, *tensors, direction, chunk in calls:
        _, _, model_of, feeds_of = _KERNELS[op]
        mode = "custom" if backend == "ort-custom" else "portable"
        model = model_of(direction, chunk, mode=mode)
        if mode == "custom":
            session = export.session(model, intra_op_num_threads=threads)
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = feeds_of(*tensors)
        runners.append(lambda s=session, f=feeds: s.run(None, f))
    return runners


def _scan_seconds(backend: str, calls: list[tuple], forward, x: torch.Tensor, repeat: int) -> float:
    """Seconds of one forward pass's scans with ``backend``: the recorded ``calls`` timed alone with
    its kernels, or (TVM Relax) the time inside the compiled program's scan kernels."""
    if backend == "tvm-relax":
        return relax_scan_seconds(forward.compiled, x, repeat)
    runners = _scan_runners(backend, calls)
    with gspn_tvm.enabled(backend == "torch-tvm"):
        return sum(median_seconds(fn, repeat, 1) for fn in runners)


def _prepare(backend: str, model, x, folder: Path) -> tuple[Callable[[], object], Path | None]:
    """``(run, artifact)``: a callable running one forward pass, and a file/folder a fresh process
    can load the same backend from (None for torch backends, which rebuild the model)."""
    threads = torch.get_num_threads()
    if backend in ("torch-reference", "torch-tvm"):
        def run():
            with torch.no_grad():
                return model(x)

        return run, None
    if backend in ("ort-custom", "ort-portable"):
        mode = "custom" if backend == "ort-custom" else "portable"
        path = folder / f"{mode}.onnx"
        export.to_onnx(model, (x,), path, mode=mode, dynamic=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if mode == "custom":
            session = export.session(path, intra_op_num_threads=threads)
        else:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {session.get_inputs()[0].name: x.numpy()}
        return (lambda: session.run(None, feeds)), path
    if backend == "tvm-relax":
        compiled = gspn_tvm.compile_model(model, (x,), dynamic=False)
        artifact = compiled.save(folder / "relax")

        def run_compiled():
            return compiled(x)

        run_compiled.compiled = compiled  # for relax_scan_seconds
        return run_compiled, artifact
    raise ValueError(f"backend: expected one of {BACKENDS}; got {backend!r}")


def relax_scan_seconds(compiled, x: torch.Tensor, repeat: int) -> float:
    """Median over ``repeat`` runs of ``compiled`` (a :class:`gspn_tvm.CompiledModel`) on ``x`` of the
    seconds spent inside its scan kernels (the PrimFuncs named ``gspn_*``), timed around each call
    by the Relax VM's instrument hook."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(compiled.executable, tvm.cpu())
    started, spent = {}, []

    def instrument(func, symbol, before, ret, *args):
        if symbol.startswith("gspn_"):
            if before:
                started[symbol] = time.perf_counter()
            else:
                spent[-1] += time.perf_counter() - started[symbol]
        return 0

    vm.set_instrument(instrument)
    inputs = [tvm.runtime.from_dlpack(x.contiguous()), *compiled._params]
    runs = []
    for _ in range(repeat + 1):  # the first run warms up
        spent.append(0.0)
        vm["main"](*inputs)
        runs.append(spent[-1])
    return float(np.median(runs[1:]))


def peak_rss_mb(case: str, backend: str, artifact: Path | None) -> float:
    """Peak resident memory (MB) of a fresh process that runs ``case`` with ``backend`` three times."""
    spec = json.dumps({"case": case, "backend": backend, "artifact": str(artifact) if artifact else None})
    done = subprocess.run([sys.executable, "-m", "gspn.bench.models", "--peak-rss", spec],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_MB"]


def _peak_rss_worker(spec: dict) -> float:
    """Run one backend three times in this (fresh) process; returns ``ru_maxrss`` in MB."""
    case, backend, artifact = spec["case"], spec["backend"], spec["artifact"]
    _, shape = CASES[case]
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    if backend in ("torch-reference", "torch-tvm"):
        model, tensor = build_case(case)
        if backend == "torch-tvm":
            gspn_tvm.enable()
        run = lambda: model(tensor)  # noqa: E731
    elif backend == "ort-custom":
        session = export.session(artifact)
        run = lambda: session.run(None, {session.get_inputs()[0].name: x})  # noqa: E731
    elif backend == "ort-portable":
        session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, {session.get_inputs()[0].name: x})  # noqa: E731
    else:
        from gspn_tvm.runtime_loader import load_artifact

        deployed = load_artifact(artifact)
        run = lambda: deployed.run(x)  # noqa: E731
    with torch.no_grad():
        for _ in range(3):
            run()
    return resident_peak_mb()


def resident_peak_mb() -> float:
    """Peak resident memory (MB) of this process since its last ``execve``: ``VmHWM`` of
    ``/proc/self/status``. Not ``ru_maxrss``: Linux carries that across ``execve`` from the process
    that forked this one, so a worker started by a benchmark holding 13 GB reported 13 GB whatever it
    used itself (the earlier tables' peak RSS grew with each backend measured). ``ru_maxrss`` only
    where there is no ``/proc``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(cases=None, quick: bool = False, backends=BACKENDS) -> list[dict]:
    """Rows of table ``"model"``: one per case and backend, with ``scan_ms``, ``scan_share`` and
    (for :data:`PEAK_MEMORY_CASES`) ``peak_rss_MB`` in ``extra``."""
    cases = cases or (QUICK_CASES if quick else tuple(CASES))
    repeat = 3 if quick else 10
    rows = []
    for case in cases:
        model, x = build_case(case)
        calls = record_scans(model, x)
        with tempfile.TemporaryDirectory() as tmp:
            for backend in backends:
                with gspn_tvm.enabled(backend == "torch-tvm"):
                    start = time.perf_counter()
                    forward, artifact = _prepare(backend, model, x, Path(tmp))
                    prepare_s = time.perf_counter() - start
                    seconds = median_seconds(forward, repeat if backend != "torch-reference" else max(2, repeat // 3), 1)
                scan_s = _scan_seconds(backend, calls, forward, x, repeat)
                extra = {"scan_ms": round(scan_s * 1e3, 3), "scan_share": round(scan_s / seconds, 3),
                         "scans": len(calls), "prepare_s": round(prepare_s, 2)}  # fmt: skip
                if case in PEAK_MEMORY_CASES:
                    extra["peak_rss_MB"] = round(peak_rss_mb(case, backend, artifact), 1)
                rows.append(row("model", case, backend, seconds, **extra))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-rss", help="(internal) run one backend in this process and print its peak RSS")
    args = parser.parse_args(argv)
    if args.peak_rss:
        print(json.dumps({"peak_rss_MB": _peak_rss_worker(json.loads(args.peak_rss))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
