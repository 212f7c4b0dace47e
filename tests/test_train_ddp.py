"""examples/train_ddp.py under torchrun (two processes, DistributedDataParallel, TVM kernels) equals
one process training on the same global batches."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gspn_tvm
from gspn_tvm import build

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"
STEPS, GLOBAL_BATCH, LR, SEED = 3, 8, 0.05, 0


@pytest.fixture(scope="module")
def train_ddp():
    spec = importlib.util.spec_from_file_location("train_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two processes under torchrun: the trained state dict and the printed global losses."""
    build.load_scan_library("cpu", "float32")  # compile (or load) once here, not in both workers at once
    out = tmp_path_factory.mktemp("ddp") / "state.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
               "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH), "--lr", str(LR), "--seed", str(SEED),
               "--save", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes (gloo, cpu), TVM kernels" in result.stdout, result.stdout
    losses = [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", result.stdout)]
    return torch.load(out, weights_only=True), losses


def single_process_run(train_ddp):
    """The same training in this process, one model on the whole global batch, TVM kernels on."""
    model = train_ddp.build_model(SEED)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = train_ddp.synthetic_batches(STEPS, GLOBAL_BATCH, train_ddp.SMALL_CONFIG["img_size"], seed=SEED + 1)
    gspn_tvm.enable()
    try:
        losses = train_ddp.train(model, batches, train_ddp.make_optimizer(model, LR))
    finally:
        gspn_tvm.disable()
    return initial, model.state_dict(), losses


def test_two_processes_equal_one_process_on_the_global_batch(train_ddp, ddp_run):
    ddp_state, ddp_losses = ddp_run
    initial, single_state, single_losses = single_process_run(train_ddp)
    assert list(ddp_state) == list(single_state)
    assert len(ddp_losses) == STEPS
    # float32: the two runs sum the batch in a different order (two halves, then the all-reduce), so
    # each gradient differs by a few ulps of its scale (4 measured), carried through STEPS momentum
    # updates: 64 ulps of the tensor's scale leaves a 16x margin.
    eps = torch.finfo(torch.float32).eps
    moved = 0
    for name, expected in single_state.items():
        scale = max(expected.abs().max().item(), initial[name].abs().max().item(), 1e-3)
        tolerance = 64 * eps * scale
        error = (ddp_state[name] - expected).abs().max().item()
        assert error <= tolerance, f"{name}: max |ddp - single| {error:.3e} > {tolerance:.3e}"
        # Training really moved the weights, by far more than the tolerance.
        moved += (expected - initial[name]).abs().max().item() > 100 * tolerance
    assert moved >= len(single_state) // 2, f"only {moved} of {len(single_state)} tensors changed"
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=0, atol=1e-5)  # printed with 6 decimals


def test_uneven_global_batch_is_refused(train_ddp):
    model = train_ddp.build_model(SEED)
    batches = train_ddp.synthetic_batches(1, 3, 32)
    with pytest.raises(ValueError, match=r"the global batch \(3\) must divide evenly over 2 processes"):
        train_ddp.train(model, batches, train_ddp.make_optimizer(model), rank=0, world_size=2)
