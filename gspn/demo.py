"""``gspn demo``: every capability that works, on built-in inputs; files go to an output folder.

Steps: the classifier on the reference kernels, torch.export, affinity heatmaps, ONNX export in
ONNX Runtime (custom operator and portable form), the TVM kernels, the whole model compiled by
TVM Relax and run by the TVM runtime alone, and the paper's network (GSPN-T): built, run, exported
to ONNX Runtime, and the original code's tiny16 vectors reproduced.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from .bench.core import median_seconds


@contextlib.contextmanager
def _native_warnings_to(path: Path):
    """Send what native code (TVM's C++ logging) writes to stderr into ``path`` for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"  {label}: {1e3 * (time.perf_counter() - start):.1f} ms")
    return result


def demo(out_dir: Path) -> None:
    """Every capability on built-in inputs: the classifier, torch.export, heatmaps, ONNX Runtime,
    TVM kernels and the Relax-compiled model; files go to ``out_dir``."""
    from gspn_ref import TinyGSPNClassifier
    from gspn_ref.visualize import affinity_heatmaps, synthetic_image

    torch.manual_seed(0)
    print("== 1. Tiny GSPN classifier on the PyTorch reference kernels")
    model = TinyGSPNClassifier(num_classes=10).eval()
    images = synthetic_image(64).repeat(2, 1, 1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  model: {n_params:,} parameters, input {tuple(images.shape)}")
    with torch.no_grad():
        logits = _timed("forward (first call)", lambda: model(images))
        _timed("forward (warm)", lambda: model(images))
    print(f"  logits {tuple(logits.shape)}, predicted classes {logits.argmax(1).tolist()}")

    print("== 2. torch.export keeps one gspn.fused_scan node per direction (logits, gate and skip in)")
    program = _timed("torch.export", lambda: torch.export.export(model, (images,)))
    fused = torch.ops.gspn.fused_scan.default
    scans = [n.args[-2] for n in program.graph.nodes if n.op == "call_function" and n.target == fused]
    print(f"  {len(scans)} gspn.fused_scan nodes: {scans}")
    with torch.no_grad():
        diff = (program.module()(images) - logits).abs().max().item()
    print(f"  exported program vs eager: max |diff| {diff:.2e}")

    print("== 3. Affinity heatmaps (four directions and the aggregate)")
    from gspn_ref import GSPN

    layer = GSPN(3, d_inner=8, d_proxy=4)
    paths = _timed("affinity matrices + PNG", lambda: affinity_heatmaps(layer, synthetic_image(32), (16, 16), out_dir / "heatmaps"))
    for name, path in paths.items():
        print(f"  {name:>10}: {path}")

    demo_onnx(model, images, out_dir)
    demo_tvm(model, images, logits)
    demo_relax(model, images, out_dir)
    demo_paper_network(out_dir)


def demo_onnx(model, images, out_dir: Path) -> None:
    """Export ``model`` both ways, run each in ONNX Runtime at another size, report agreement."""
    import onnx
    import onnxruntime as ort

    import export

    print("== 4. ONNX export and ONNX Runtime")
    other = torch.randn(3, 3, 48, 80)  # another batch and image size than the export saw
    with torch.no_grad():
        expected = model(other)
    custom = _timed("torch -> ONNX (custom GSPNFusedScan nodes)", lambda: export.to_onnx(model, (images,), out_dir / "tiny_classifier_custom.onnx"))
    portable = _timed("custom -> portable (standard ops only)", lambda: export.make_portable(custom))
    onnx.save(portable, out_dir / "tiny_classifier_portable.onnx")
    for mode in ("custom", "portable"):
        path = out_dir / f"tiny_classifier_{mode}.onnx"
        if mode == "custom":
            sess = export.session(path)
        else:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        result = torch.from_numpy(sess.run(None, {"x": other.numpy()})[0])
        seconds = median_seconds(lambda: sess.run(None, {"x": other.numpy()}), repeat=5, warmup=1)
        diff = (result - expected).abs().max().item()
        print(f"  {path}")
        print(f"  {mode:8s} at {tuple(other.shape)}: {seconds * 1e3:.1f} ms, max |ORT - torch| {diff:.2e}, "
              f"same top-1 {bool((result.argmax(1) == expected.argmax(1)).all())}")
    print(f"  custom-op library: {export.library_path()}")


def demo_tvm(model, images, logits) -> None:
    """Run the classifier with the TVM kernels registered on gspn::scan; compare with the reference."""
    import gspn_tvm
    from gspn_tvm import build

    print("== 5. TVM TensorIR kernels as the kernels of gspn::scan")
    _timed("load (or compile and cache) the CPU scan library", lambda: build.load_scan_library("cpu", "float32"))
    print(f"  cache: {gspn_tvm.cache_root()}")
    gspn_tvm.enable()
    try:
        with torch.no_grad():
            result = model(images)
            tvm_s = median_seconds(lambda: model(images), repeat=5, warmup=1)
        x = images.clone().requires_grad_()
        model(x).sum().backward()  # forward and adjoint both run TVM code
    finally:
        gspn_tvm.disable()
    with torch.no_grad():
        ref_s = median_seconds(lambda: model(images), repeat=5, warmup=1)
    print(f"  classifier forward: TVM kernels {tvm_s * 1e3:.1f} ms, reference kernels {ref_s * 1e3:.1f} ms")
    print(f"  max |TVM - reference| {(result - logits).abs().max().item():.2e}; input gradient norm {x.grad.norm():.4f}")


def demo_relax(model, images, out_dir: Path) -> None:
    """Compile the whole classifier with TVM Relax, save it, run the artifact with the runtime alone."""
    import subprocess

    import numpy as np

    from gspn_tvm import compile_model, runtime_loader

    print("== 6. Whole model compiled by TVM Relax, deployed with the TVM runtime alone")
    log = out_dir / "tvm_compile.log"
    with _native_warnings_to(log):
        compiled = _timed("torch.export -> Relax -> compile (llvm)", lambda: compile_model(model, (images,)))
    print(f"  TVM's compiler log: {log}")
    other = torch.randn(3, 3, 48, 80)
    with torch.no_grad():
        expected = model(other)
        eager_s = median_seconds(lambda: model(other), repeat=5, warmup=1)
    result = compiled(other)
    compiled_s = median_seconds(lambda: compiled(other), repeat=5, warmup=1)
    print(f"  at {tuple(other.shape)}: compiled {compiled_s * 1e3:.1f} ms, torch eager {eager_s * 1e3:.1f} ms, "
          f"max |TVM - torch| {(result - expected).abs().max().item():.2e}")
    with _native_warnings_to(log):
        artifact = compiled.save(out_dir / "tiny_classifier_tvm")
    np.save(out_dir / "tiny_classifier_input.npy", other.numpy())
    subprocess.run(
        [sys.executable, runtime_loader.__file__, str(artifact), str(out_dir / "tiny_classifier_input.npy"),
         "--out", str(out_dir / "tiny_classifier_tvm_logits.npz")],
        env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"}, check=True, capture_output=True,
    )  # fmt: skip
    deployed = torch.from_numpy(np.load(out_dir / "tiny_classifier_tvm_logits.npz")["arr_0"])
    print(f"  artifact {artifact} ({', '.join(sorted(p.name for p in artifact.iterdir()))})")
    print(f"  runtime-only process (TVM_USE_RUNTIME_LIB=1): max |diff| {(deployed - expected).abs().max().item():.2e}")


def demo_paper_network(out_dir: Path) -> None:
    """GSPN-T (random weights) at 224 x 224: eager, exported with the custom operator and run in ONNX
    Runtime; then the original code's tiny16 vectors (shipped in gspn_ref/data) reproduced."""
    import json

    import export
    from gspn_ref.models import from_official_config, gspn_tiny
    from gspn_ref.testing import official_network_state, official_network_vectors

    print("== 7. The paper's network (GSPN-T)")
    torch.manual_seed(0)
    net = _timed("build GSPN-T (random weights)", lambda: gspn_tiny(num_classes=1000).eval())
    scans = sum(1 for _ in net.block_chunks())
    print(f"  {sum(p.numel() for p in net.parameters()):,} parameters, {scans} token mixers (one gspn.fused_scan each)")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = _timed("forward at (1, 3, 224, 224)", lambda: net(image))
    path = out_dir / "gspn_t_custom.onnx"
    _timed("torch -> ONNX (custom GSPNFusedScan nodes, fixed size)", lambda: export.to_onnx(net, (image,), path, dynamic=False))
    session = export.session(path)
    feeds = {session.get_inputs()[0].name: image.numpy()}
    result = torch.from_numpy(session.run(None, feeds)[0])
    seconds = median_seconds(lambda: session.run(None, feeds), repeat=3, warmup=0)
    print(f"  {path}")
    print(f"  ONNX Runtime: {seconds * 1e3:.1f} ms, max |ORT - torch| {(result - logits).abs().max().item():.2e}, "
          f"same top-1 {bool((result.argmax(1) == logits.argmax(1)).all())}")

    vectors = official_network_vectors()
    tiny16 = from_official_config(json.loads(str(vectors["config"])))
    tiny16.load_state_dict(official_network_state(vectors), strict=True)
    inputs, original = torch.from_numpy(vectors["input"]), torch.from_numpy(vectors["logits"])
    with torch.no_grad():
        ours = tiny16.eval()(inputs)
    print(f"  original code's tiny16 network (EMBED_DIM 16, 10 classes): weights loaded strictly, "
          f"input {tuple(inputs.shape)}")
    print(f"  logits: max |ours - original| {(ours - original).abs().max().item():.2e}, "
          f"same top-1 {bool((ours.argmax(1) == original.argmax(1)).all())}")
