"""Element counts beyond 2**31 (issue 8): every backend owned here indexes with 64 bits.

- Reference (``gspn_scan_ref``, ``gspn_scan``, the operator): pure PyTorch, whose kernels index
  with 64 bits; the Python code around them (validation, scan frames, the line loop, the fake
  kernels) is exercised on ``meta`` tensors of more than 2**31 elements, which allocate nothing.
- TVM CPU kernels: shapes are ``T.int64`` variables and every index expression of the compiled
  functions is int64 (checked on the lowered code); one real forward scan over 2**31 + 2**16
  float16 elements (two planes) proves it end to end. Its inputs are private anonymous memory maps that are
  never written except in the last rows (untouched pages read as zeros and take no memory), so the
  run needs the 4 GiB output and little else (about 15 s on 2 cores). It runs in a subprocess: with 32-bit indices the
  writes past element 2**31 would wrap and crash it, or land at the start of the output.
  The TVM kernels reject ``meta`` tensors with a ``ValueError``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gspn_ref
from gspn_tvm import kernels

ROOT = Path(__file__).resolve().parents[2]
BEYOND_INT32 = (1, 2**21, 1, 32, 33)  # B, C, G, H, W: 33 * 2**26 elements (> 2**31), lines <= 33


def _meta_inputs(B, C, G, H, W, dtype=torch.float16):
    return [torch.empty(s, dtype=dtype, device="meta") for s in [(B, C, H, W)] * 2 + [(B, G, H, W)] * 3]


@pytest.mark.parametrize("direction", ["t2b", "r2l"])
def test_reference_handles_more_than_2_pow_31_elements(direction):
    B, C, G, H, W = BEYOND_INT32
    x, lam, gl, gm, gr = _meta_inputs(B, C, G, H, W)
    assert x.numel() > 2**31
    for h in (gspn_ref.gspn_scan_ref(x, lam, gl, gm, gr, direction, 5), gspn_ref.gspn_scan(x, lam, gl, gm, gr, direction, 5)):
        assert h.shape == x.shape and h.dtype == x.dtype and h.device.type == "meta"
    grads = gspn_ref.gspn_scan_backward_ref(torch.empty_like(x), x, lam, gl, gm, gr, torch.empty_like(x), direction, 5)
    assert [g.shape for g in grads] == [t.shape for t in (x, lam, gl, gm, gr)]


def test_tvm_kernels_reject_meta_tensors_clearly():
    x, lam, gl, gm, gr = _meta_inputs(*BEYOND_INT32)
    with pytest.raises(ValueError, match=r"^x: expected a tensor on one of \['cpu', 'cuda'\]"):
        kernels.scan_forward(x, lam, gl, gm, gr, "t2b", 0)
    with pytest.raises(ValueError, match=r"^x: expected a tensor on one of"):
        kernels.scan_backward(torch.empty_like(x), x, lam, gl, gm, gr, torch.empty_like(x), "l2r", 0)


def test_tvm_index_arithmetic_is_64_bit():
    """No 32-bit index survives lowering: after TVM's own narrowing pass (``NarrowDataType(32)``),
    every compiled CPU function still indexes its flattened buffers with int64 expressions."""
    import tvm
    from tvm import s_tir, tirx

    from gspn_tvm.schedules import cpu

    passes = [
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(), tirx.transform.NarrowDataType(32),
    ]
    for direction in gspn_ref.DIRECTIONS:
        for schedule in (cpu.schedule_forward, cpu.schedule_backward):
            mod = tvm.IRModule({"main": schedule(direction, "float16")})
            with tvm.transform.PassContext(opt_level=3):
                lowered = tvm.ir.transform.Sequential(passes)(mod)["main"].script()
            # int32 shape variables or index casts would print as T.int32() / "int32"; int64 ones as
            # TypeVars (the flattened indices are products of the int64 shape variables)
            assert "int32" not in lowered, f"{schedule.__name__}({direction}): 32-bit index arithmetic after lowering"
            assert "B * C * H * W" in lowered or "B * G * H * W" in lowered


LARGE_FORWARD = """
import mmap, torch
import gspn_ref
from gspn_tvm import kernels

# 2 planes of 2**15 x (2**15 + 1): 2**31 + 2**16 elements, offsets in the second plane exceed 2**31
B, C, G, H, W = 1, 2, 2, 2**15, 2**15 + 1
n = B * C * H * W
def zeros_without_memory():
    # private anonymous map: untouched pages read as zeros and are never allocated
    buffer = mmap.mmap(-1, 2 * n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=torch.float16).view(B, C, H, W)
x, lam, gl, gm, gr = (zeros_without_memory() for _ in range(5))
tail = [t[:, 1:, H - 3:, :] for t in (x, lam, gl, gm, gr)]  # the last rows of the last plane
gen = torch.Generator().manual_seed(0)
for t in tail:
    t.copy_(torch.rand(t.shape, generator=gen).to(torch.float16))
h = kernels.scan_forward(x, lam, gl, gm, gr, "t2b", 0)
# The rows before the tail are zero, so the tail's scan is the scan of the tail alone.
expected = gspn_ref.gspn_scan_ref(*[t.contiguous() for t in tail], "t2b", 0)
error = (h[:, 1:, H - 3:, :].float() - expected.float()).abs().max().item()
print("tail max |diff|", error, "scale", expected.abs().max().item())
assert error <= 2e-2 * expected.abs().max().item(), error
stray = torch.count_nonzero(h[:, :1]).item() + torch.count_nonzero(h[:, 1:, : H - 3]).item()
assert stray == 0, f"{stray} writes landed outside their rows"
print("OK")
"""


def test_tvm_forward_beyond_2_pow_31_elements():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LARGE_FORWARD)], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0, f"exit {result.returncode} (negative: killed by signal {-result.returncode})"
    assert result.stdout.strip().endswith("OK")
