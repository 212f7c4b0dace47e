"""Saved TVM Relax artifacts (``CompiledModel.save`` / ``gspn_tvm.runtime_loader``) against malformed files.

One small GSPN layer is compiled once (for ``x86-64-v2``, so the artifact runs on any machine the
tests run on) and saved; every test corrupts its own copy. Where a corrupt file could reach the
dynamic loader or the parameter parser (and kill the process), the load runs in a subprocess with
the TVM runtime alone, as deployed, and the test fails on any signal.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn_ref import GSPN
from gspn_tvm import isa
from gspn_tvm.relax_frontend import compile_model, compile_onnx
from gspn_tvm.runtime_loader import SIGNATURE_VERSION, load_artifact
from tests.helpers import assert_close_scaled

LOADER_FILE = Path(__file__).resolve().parents[2] / "gspn_tvm" / "runtime_loader.py"
SHAPE = (2, 4, 6, 5)


@pytest.fixture(scope="module")
def layer() -> GSPN:
    layer = GSPN(4, d_proxy=2, chunk=2, groups=2)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)  # every parameter distinct
    return layer.eval()


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(22))


@pytest.fixture(scope="module")
def saved(layer, example, tmp_path_factory) -> Path:
    compiled = compile_model(layer, (example,), target={"kind": "llvm", "mcpu": "x86-64-v2"})
    return compiled.save(tmp_path_factory.mktemp("artifact") / "layer")


@pytest.fixture
def artifact(saved, tmp_path) -> Path:
    """A private copy of the saved artifact."""
    return Path(shutil.copytree(saved, tmp_path / "layer"))


def signature_of(folder: Path) -> dict:
    return json.loads((folder / "signature.json").read_text())


def write_signature(folder: Path, signature: dict) -> None:
    (folder / "signature.json").write_text(json.dumps(signature))


def eager(layer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    sys.modules["torch"] = None
    import numpy as np
    spec = importlib.util.spec_from_file_location("runtime_loader", sys.argv[1])
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    try:
        model = loader.load_artifact(sys.argv[2])
    except ValueError as error:
        print("refused:", error)
        raise SystemExit(0)
    np.save(sys.argv[4], model.run(np.load(sys.argv[3])))
    print("ran")
    """
)


def load_in_subprocess(folder: Path, x: torch.Tensor) -> subprocess.CompletedProcess:
    """Load and run ``folder`` with the TVM runtime alone; fails the test if the process died of a signal."""
    inputs, outputs = folder.parent / "in.npy", folder.parent / "out.npy"
    np.save(inputs, x.numpy())
    env = {"TVM_USE_RUNTIME_LIB": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(LOADER_FILE), str(folder), str(inputs), str(outputs)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode >= 0, f"loader killed by {signal.Signals(-result.returncode).name}: {result.stderr[-2000:]}"
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_saved_artifact_records_target_features_and_checksums(saved, layer, example):
    signature = signature_of(saved)
    assert signature["version"] == SIGNATURE_VERSION
    assert signature["cpu_level"] == "x86-64-v2" and signature["target"]["mcpu"] == "x86-64-v2"
    assert {"sse4_2", "popcnt", "ssse3"} <= set(signature["required_cpu_features"])
    assert not {"avx", "avx2", "avx512f"} & set(signature["required_cpu_features"])
    for name in ("model.so", "params.bin"):
        assert len(signature["files"][name]) == 64
    named_parameters = dict(layer.named_parameters())
    assert len(signature["params"]) == len(named_parameters)
    model = load_artifact(saved)
    assert_close_scaled(torch.from_numpy(model.run(example.numpy())), eager(layer, example), torch.float32, 64)


# -- corrupt files: refused before they are loaded, in a process of their own ----------------------


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_bit(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def _params_missing_last_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-4])


CORRUPTIONS = {
    "model.so truncated to half": ("model.so", lambda p: _truncate(p, 0.5)),
    "model.so truncated to its header": ("model.so", lambda p: _truncate(p, 0.02)),
    "model.so one bit flipped in its code": ("model.so", lambda p: _flip_bit(p, 0.3)),
    "model.so one bit flipped in its ELF header": ("model.so", lambda p: _flip_bit(p, 0.0001)),
    "model.so replaced by garbage": ("model.so", lambda p: p.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)),
    "params.bin missing its last bytes": ("params.bin", _params_missing_last_bytes),
    "params.bin one bit flipped": ("params.bin", lambda p: _flip_bit(p, 0.9)),
    "params.bin empty": ("params.bin", lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_file_is_refused_without_crashing(artifact, example, case):
    name, corrupt = CORRUPTIONS[case]
    corrupt(artifact / name)
    result = load_in_subprocess(artifact, example)
    assert f"refused: {artifact / name}: its sha256" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "truncated, corrupt or from another artifact" in result.stdout


def test_intact_artifact_runs_in_the_same_harness(artifact, layer, example):
    """The subprocess harness itself loads and runs a good artifact (so the refusals above are real)."""
    result = load_in_subprocess(artifact, example)
    assert "ran" in result.stdout
    actual = torch.from_numpy(np.load(artifact.parent / "out.npy"))
    assert_close_scaled(actual, eager(layer, example), torch.float32, 64, "runtime-only output")


# -- signature edits ---------------------------------------------------------------------------


def _same_shape_pair(signature: dict) -> tuple[int, int]:
    by_shape: dict[tuple, int] = {}
    for i, entry in enumerate(signature["params"]):
        key = (tuple(entry["shape"]), entry["dtype"])
        if key in by_shape:
            return by_shape[key], i
        by_shape[key] = i
    raise AssertionError("the test layer has no two parameters of one shape")


def test_swapped_parameter_names_are_refused(artifact):
    signature = signature_of(artifact)
    i, j = _same_shape_pair(signature)
    params = signature["params"]
    params[i]["key"], params[j]["key"] = params[j]["key"], params[i]["key"]
    write_signature(artifact, signature)
    with pytest.raises(ValueError, match=rf"parameter {i} \(.*\): recorded at position {i} but keyed for another"):
        load_artifact(artifact)


def test_swapped_parameter_entries_are_refused(artifact):
    """Whole entries swapped (key, shape, dtype and checksum move together): the position in the key catches it."""
    signature = signature_of(artifact)
    i, j = _same_shape_pair(signature)
    params = signature["params"]
    params[i], params[j] = params[j], params[i]
    write_signature(artifact, signature)
    with pytest.raises(ValueError, match=rf"parameter {i} \({params[i]['key']}\): recorded at position {i}"):
        load_artifact(artifact)


def test_parameter_values_differing_from_the_signature_are_refused(artifact):
    """Same-shape parameters swapped in ``params.bin`` with its file checksum updated: the per-parameter checksum catches it."""
    from tvm.runtime.params import load_param_dict_from_file, save_param_dict_to_file

    from gspn_tvm.runtime_loader import sha256_of

    signature = signature_of(artifact)
    i, j = _same_shape_pair(signature)
    key_i, key_j = signature["params"][i]["key"], signature["params"][j]["key"]
    named = dict(load_param_dict_from_file(str(artifact / "params.bin")))
    named[key_i], named[key_j] = named[key_j], named[key_i]
    save_param_dict_to_file(named, str(artifact / "params.bin"))
    signature["files"]["params.bin"] = sha256_of(artifact / "params.bin")
    write_signature(artifact, signature)
    with pytest.raises(ValueError, match=rf"parameter {i} \({key_i}\): its values are not the ones signature.json records"):
        load_artifact(artifact)


def test_parameter_shape_differing_from_the_signature_is_refused(artifact):
    signature = signature_of(artifact)
    signature["params"][1]["shape"] = [3, *signature["params"][1]["shape"][1:]]
    write_signature(artifact, signature)
    with pytest.raises(ValueError, match=r"parameter 1 \(.*\): signature.json records shape \(3, .*params.bin holds \("):
        load_artifact(artifact)


def test_missing_parameter_is_refused(artifact):
    signature = signature_of(artifact)
    dropped = signature["params"].pop()["key"]
    write_signature(artifact, signature)
    with pytest.raises(ValueError, match=rf"params.bin: holds parameters .*'{dropped}'.*; signature.json lists"):
        load_artifact(artifact)


def test_old_signature_version_is_refused_with_the_way_out(artifact):
    signature = signature_of(artifact)
    signature["version"] = 1
    write_signature(artifact, signature)
    with pytest.raises(ValueError, match=r"signature version 1; this loader reads version 2 .*save the model again"):
        load_artifact(artifact)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"signature.json: not readable JSON"),
        ("[1, 2]", r"signature.json: expected a JSON object; got list"),
        (json.dumps({"version": SIGNATURE_VERSION}), r"signature.json: missing field\(s\) device_type, target"),
    ],
)
def test_malformed_signature_is_refused(artifact, content, message):
    (artifact / "signature.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_artifact(artifact)


def test_malformed_input_entry_is_refused(artifact):
    signature = signature_of(artifact)
    signature["inputs"][0]["shape"] = ["batch", -4, "height", "width"]
    write_signature(artifact, signature)
    with pytest.raises(ValueError, match=r"malformed input entry .*expected name, shape"):
        load_artifact(artifact)


# -- CPU features ------------------------------------------------------------------------------


def test_artifact_needing_a_feature_this_machine_lacks_is_refused(artifact, example):
    signature = signature_of(artifact)
    signature["required_cpu_features"].append("gspn_made_up_feature")
    write_signature(artifact, signature)
    result = load_in_subprocess(artifact, example)
    assert "refused:" in result.stdout and "needs CPU features this machine does not report: gspn_made_up_feature" in result.stdout
    assert "illegal instruction" in result.stdout


def test_artifact_is_refused_on_a_machine_below_its_level(artifact, tmp_path, monkeypatch):
    """A machine reporting only the x86-64 baseline (emulated: a fake cpuinfo) refuses the x86-64-v2 artifact."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some Big CPU 9000\nflags\t\t: " + " ".join(sorted(isa.LEVEL_FEATURES["x86-64"])) + "\n")
    monkeypatch.setattr(isa, "CPUINFO", cpuinfo)
    monkeypatch.setattr(isa, "is_x86_64", lambda: True)
    monkeypatch.delenv(isa.ENV_VAR, raising=False)
    v2_only = sorted(isa.LEVEL_FEATURES["x86-64-v2"] - isa.LEVEL_FEATURES["x86-64"])
    with pytest.raises(ValueError, match=rf"compiled for x86-64-v2 and needs CPU features .*: {', '.join(v2_only)}\."):
        load_artifact(artifact)


# -- inputs at run time ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 4, 6, 5), np.float64), r"got \(2, 4, 6, 5\) float64 \(dtype differs\)"),
        (np.zeros((2, 4, 6, 5), np.int32), r"got \(2, 4, 6, 5\) int32 \(dtype differs\)"),
        (np.zeros((2, 3, 6, 5), np.float32), r"got \(2, 3, 6, 5\) float32 \(dimension 1 is fixed at 4\)"),
        (np.zeros((4, 6, 5), np.float32), r"got \(4, 6, 5\) float32 \(rank 3 instead of 4\)"),
        (np.zeros((0, 4, 6, 5), np.float32), r"got \(0, 4, 6, 5\) float32 \(dimension 0, batch, must be >= 1\)"),
        (np.zeros((2, 4, 6, 0), np.float32), r"got \(2, 4, 6, 0\) float32 \(dimension 3, width, must be >= 1\)"),
    ],
)
def test_wrong_inputs_are_refused_with_the_compiled_shape(saved, array, message):
    model = load_artifact(saved)
    with pytest.raises(ValueError, match=r"x: the model was compiled for shape \(batch, 4, height, width\) float32; " + message):
        model.run(array)


def test_wrong_number_of_inputs_is_refused(saved):
    model = load_artifact(saved)
    with pytest.raises(ValueError, match=r"expected 1 input\(s\) \(x\); got 2"):
        model.run(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32))


def test_interrupted_save_does_not_load(saved, tmp_path):
    """``signature.json`` is written last: a folder with only the library and parameters is refused."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("model.so", "params.bin"):
        shutil.copy(saved / name, partial / name)
    with pytest.raises(FileNotFoundError, match=r"signature.json: missing; expected a folder written by CompiledModel.save"):
        load_artifact(partial)


# -- what compile_model accepts ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_float32_model_is_refused_up_front(layer, dtype):
    model = GSPN(4, d_proxy=2).to(dtype).eval()
    with pytest.raises(ValueError, match=rf"compile_model: parameter .* has dtype {str(dtype)[6:]}; .*supports float32 models only"):
        compile_model(model, (torch.zeros(SHAPE, dtype=dtype),))


def test_float16_input_to_a_float32_model_is_refused_up_front(layer):
    with pytest.raises(ValueError, match=r"compile_model: example_args\[0\] has dtype float16"):
        compile_model(layer, (torch.zeros(SHAPE, dtype=torch.float16),))


def test_float16_onnx_model_is_refused_up_front(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    with pytest.raises(ValueError, match=r"compile_onnx: input 'x' has dtype float16"):
        compile_onnx(model)


@pytest.mark.parametrize("mcpu", ["znver4", "skylake-avx512", "native"])
def test_cpu_model_name_target_is_refused(layer, mcpu):
    with pytest.raises(ValueError, match=rf"target: mcpu must be one of x86-64, x86-64-v2, .*got '{mcpu}'"):
        compile_model(layer, (torch.zeros(SHAPE),), target={"kind": "llvm", "mcpu": mcpu})


def test_target_features_by_mattr_are_refused(layer):
    with pytest.raises(ValueError, match=r"target: 'mattr' is not supported"):
        compile_model(layer, (torch.zeros(SHAPE),), target={"kind": "llvm", "mcpu": "x86-64-v2", "mattr": ["+avx512f"]})
