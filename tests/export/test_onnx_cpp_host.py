"""The C++ host (examples/cpp) runs an exported model with no Python in its process."""

from __future__ import annotations

import subprocess

import onnx

import numpy as np
import torch

import export
import gspn_ref
from export.build import build_cpp_host
from helpers import assert_close_scaled, make_scan_inputs


def write_tensors(path, arrays):
    """int64 count; per tensor int64 rank, int64 dims, float32 data (examples/cpp/main.cc)."""
    with open(path, "wb") as f:
        f.write(np.int64(len(arrays)).tobytes())
        for array in arrays:
            array = np.ascontiguousarray(array, dtype=np.float32)
            f.write(np.int64(array.ndim).tobytes())
            f.write(np.asarray(array.shape, dtype=np.int64).tobytes())
            f.write(array.tobytes())


def read_tensors(path):
    data = open(path, "rb").read()
    count, offset = int(np.frombuffer(data, np.int64, 1, 0)[0]), 8
    arrays = []
    for _ in range(count):
        rank = int(np.frombuffer(data, np.int64, 1, offset)[0])
        shape = tuple(int(d) for d in np.frombuffer(data, np.int64, rank, offset + 8))
        offset += 8 + 8 * rank
        size = int(np.prod(shape))
        arrays.append(np.frombuffer(data, np.float32, size, offset).reshape(shape))
        offset += 4 * size
    return arrays


def run_host(tmp_path, model_path, inputs):
    executable = build_cpp_host()
    write_tensors(tmp_path / "inputs.bin", inputs)
    result = subprocess.run(
        [str(executable), str(model_path), str(export.library_path()),
         str(tmp_path / "inputs.bin"), str(tmp_path / "outputs.bin")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return read_tensors(tmp_path / "outputs.bin")


def test_cpp_host_runs_a_scan_model(tmp_path):
    direction, chunk = "r2l", 3
    model_path = tmp_path / "scan.onnx"
    onnx.save(export.scan_model(direction, chunk), model_path)
    inputs = make_scan_inputs(2, 6, 3, 9, 23, torch.float32, seed=7, direction=direction)
    (out,) = run_host(tmp_path, model_path, [t.numpy() for t in inputs])
    expected = gspn_ref.gspn_scan_ref(*inputs, direction=direction, chunk=chunk)
    assert_close_scaled(torch.from_numpy(out.copy()), expected, torch.float32, 23, "C++ host scan")


def test_cpp_host_runs_an_exported_layer(tmp_path):
    torch.manual_seed(3)
    layer = gspn_ref.GSPN(8, d_proxy=4).eval()
    model_path = tmp_path / "layer.onnx"
    export.to_onnx(layer, (torch.randn(2, 8, 12, 12),), model_path)
    x = torch.randn(1, 8, 13, 21)
    (out,) = run_host(tmp_path, model_path, [x.numpy()])
    with torch.no_grad():
        expected = layer(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
