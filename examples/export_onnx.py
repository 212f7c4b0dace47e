"""Export the tiny GSPN classifier to ONNX both ways and run it in ONNX Runtime.

    python examples/export_onnx.py [output_dir]

custom:   one gspn::GSPNScan node per scan, run with the native library (export.session)
portable: standard ONNX operators only, run by stock ONNX Runtime with nothing registered
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import export
import gspn_ref


def main(output_dir: Path) -> None:
    torch.manual_seed(0)
    model = gspn_ref.TinyGSPNClassifier().eval()
    example = torch.randn(2, 3, 32, 32)
    export.to_onnx(model, (example,), output_dir / "tiny_custom.onnx", mode="custom")
    export.to_onnx(model, (example,), output_dir / "tiny_portable.onnx", mode="portable")

    custom = export.session(output_dir / "tiny_custom.onnx")
    portable = ort.InferenceSession(str(output_dir / "tiny_portable.onnx"), providers=["CPUExecutionProvider"])

    x = torch.randn(3, 3, 48, 64)  # another batch size and image size than the export used
    with torch.no_grad():
        expected = model(x).numpy()
    for name, sess in (("custom", custom), ("portable", portable)):
        logits = sess.run(None, {"x": x.numpy()})[0]
        print(f"{name:9s} max |ORT - torch| = {np.abs(logits - expected).max():.2e}, "
              f"same top-1: {bool((logits.argmax(1) == expected.argmax(1)).all())}")
    print(f"models written to {output_dir}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder))
