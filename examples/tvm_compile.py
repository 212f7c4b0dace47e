"""Compile the tiny GSPN classifier with TVM Relax, save it, and run it with the TVM runtime alone.

    python examples/tvm_compile.py [OUT_DIR]

The saved folder (model.so, params.bin, signature.json) is what a service deploys: it needs
``tvm`` (the runtime is enough), numpy and ``gspn_tvm/runtime_loader.py``, not torch.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gspn_ref import TinyGSPNClassifier
from gspn_tvm.relax_frontend import compile_model

LOADER = Path(__file__).resolve().parents[1] / "gspn_tvm" / "runtime_loader.py"

torch.manual_seed(0)
model = TinyGSPNClassifier().eval()
x = torch.randn(2, 3, 64, 64)

start = time.perf_counter()
compiled = compile_model(model, (x,))  # batch, height and width stay dynamic
print(f"compiled {compiled} in {time.perf_counter() - start:.1f} s")

with torch.no_grad():
    expected = model(x)
print("max |TVM - torch| =", (compiled(x) - expected).abs().max().item())

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
artifact = compiled.save(out_dir / "tiny_gspn")
np.save(out_dir / "input.npy", x.numpy())
print("saved", sorted(p.name for p in artifact.iterdir()), "in", artifact)

# A fresh process with only the TVM runtime library (no compiler) runs the artifact.
subprocess.run(
    [sys.executable, str(LOADER), str(artifact), str(out_dir / "input.npy"), "--out", str(out_dir / "logits.npz")],
    env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"},
    check=True,
)
logits = torch.from_numpy(np.load(out_dir / "logits.npz")["arr_0"])
print("runtime-only max |diff| =", (logits - expected).abs().max().item())
