"""The benchmark runner's machinery (no timing is asserted): rows, results file, plots, crossover."""

import json

import pytest
import torch

from gspn.bench import core, crossover, fused, layer_profile, models, scans
from gspn_ref import GSPN
from gspn.bench.plot import plot_results


def test_scan_rows_have_the_schema_and_a_floor():
    rows = scans.run(shapes=[(1, 2, 1, 8, 16)], bandwidth=core.copy_bandwidth(1 << 22), directions=("l2r",))
    backends = {(r["pass"], r["backend"]) for r in rows}
    assert backends == {("forward", "torch-reference"), ("backward", "torch-reference"), ("forward", "tvm-cpu"),
                        ("backward", "tvm-cpu"), ("forward", "ort-custom"), ("forward", "ort-portable")}
    for r in rows:
        assert set(r) == set(core.ROW_KEYS)
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["ms"] / r["floor_ms"], rel=0.02)


def test_scan_bytes_counts_every_tensor_once():
    # forward: x, lam, h (B*C*H*W each) + three weights (B*G*H*W) of 4 bytes
    assert core.scan_bytes(2, 6, 3, 5, 7, torch.float32) == 4 * (3 * 2 * 6 * 35 + 3 * 2 * 3 * 35)
    assert core.scan_bytes(1, 1, 1, 1, 1, torch.float16, backward=True) == 2 * 12


def test_speedups_pair_rows_of_the_same_case():
    rows = [core.row("t", "a", "base", 0.010), core.row("t", "a", "fast", 0.002), core.row("t", "b", "fast", 0.001)]
    core.add_speedups(rows, "base")
    assert [r["speedup"] for r in rows] == [1.0, 5.0, None]


def test_results_file_round_trip_and_plots(tmp_path):
    rows = [core.row("scan", "1x2x2x8x8", b, s, direction=d, pass_=p, floor_seconds=0.001)
            for b, s in (("tvm-cpu", 0.002), ("ort-custom", 0.003)) for d in ("t2b", "l2r")
            for p in ("forward", "backward")]  # fmt: skip
    rows += [core.row("fused", "1x2x2x8x8", b, s, direction="t2b", floor_seconds=0.001)
             for b, s in (("tvm-cpu", 0.002), ("tvm-cpu unfused", 0.005))]  # fmt: skip
    rows += [core.row("model", "GSPN-T 1x3x224x224", b, s, scan_share=0.1) for b, s in (("ort-custom", 0.1), ("tvm-relax", 0.2))]
    rows += [core.row("crossover", f"{m} {n}x{n}", "ort", s) for m, n, s in
             (("GSPN layer", 14, 2e-3), ("attention", 14, 1e-3), ("GSPN layer", 28, 3e-3), ("attention", 28, 4e-3))]  # fmt: skip
    info = core.machine()
    path = core.save_results(tmp_path / "bench.json", rows, info, copy_GBps=10.0)
    payload = core.load_results(path)
    assert payload["rows"] == json.loads(json.dumps(rows)) and payload["copy_GBps"] == 10.0
    made = plot_results(payload, path)
    assert [p.name for p in made] == ["bench_scan.png", "bench_fused.png", "bench_models.png", "bench_crossover.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in made)
    with pytest.raises(ValueError, match="lacks"):
        core.save_results(tmp_path / "bad.json", [{"table": "scan"}], info)
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else/9"}))
    with pytest.raises(ValueError, match="schema"):
        core.load_results(tmp_path / "other.json")


def test_crossover_side_is_the_first_from_which_the_layer_stays_faster():
    def rows_for(times):
        return [core.row("crossover", f"{m} {n}x{n}", "b", s) for (m, n), s in times.items()]

    times = {("GSPN layer", 14): 3, ("attention", 14): 1, ("GSPN layer", 28): 2, ("attention", 28): 3,
             ("GSPN layer", 56): 4, ("attention", 56): 9}  # fmt: skip
    assert crossover.crossover_sides(rows_for(times)) == {"b": 28}
    times[("GSPN layer", 56)] = 10  # faster at 28, slower again at 56: no crossover
    assert crossover.crossover_sides(rows_for(times)) == {"b": None}


def test_attention_block_matches_explicit_attention():
    torch.manual_seed(0)
    block = crossover.Attention2d(dim=6, heads=3).double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    tokens = block.qkv(x).flatten(2).transpose(1, 2)  # (B, N, 3C)
    q, k, v = tokens.reshape(2, 12, 3, 3, 2).permute(2, 0, 3, 1, 4)  # (B, heads, N, C/heads)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2**0.5, dim=-1)
    expected = block.proj((weights @ v).transpose(-1, -2).reshape(2, 6, 3, 4))
    torch.testing.assert_close(block(x), expected)


def test_record_scans_sees_every_scan_of_a_network():
    from gspn_ref.models import gspn_tiny

    net = gspn_tiny(num_classes=10, embed_dim=16, img_size=64).eval()
    calls = models.record_scans(net, torch.randn(1, 3, 64, 64))
    mixers = sum(1 for m in net.modules() if type(m).__name__ == "GSPNMixer")
    assert len(calls) == mixers > 0
    # one t2b scan (of the transposed maps) per mixer, per-channel weights: (op, u, lam, al, am, ar, gate, skip, direction, chunk)
    assert all(c[0] == "fused_scan" and c[8] == "t2b" and c[1].shape[1] == c[3].shape[1] for c in calls)
    for backend in ("torch-reference", "ort-custom"):
        assert len(models._scan_runners(backend, calls)) == len(calls)
    with pytest.raises(ValueError, match="tvm-relax"):  # its scans are timed inside the compiled program
        models._scan_runners("tvm-relax", calls)


def test_relax_scan_seconds_times_the_compiled_scan_kernels():
    """The scan time of a Relax-compiled network is what its own ``gspn_*`` kernels take inside the
    VM: positive and under the whole run."""
    import gspn_tvm
    from gspn_ref.models import gspn_tiny

    net = gspn_tiny(num_classes=10, embed_dim=16, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = gspn_tvm.compile_model(net, (x,), dynamic=False)
    scan = models.relax_scan_seconds(compiled, x, repeat=3)
    total = core.median_seconds(lambda: compiled(x), 3, 1)
    print(f"scan {scan * 1e3:.3f} ms of {total * 1e3:.3f} ms")
    assert 0 < scan < total


def test_fused_rows_compare_with_the_unfused_ops():
    rows = fused.run(shapes=[(1, 4, 2, 8, 6)], bandwidth=core.copy_bandwidth(1 << 22), directions=("b2t",))
    assert {r["backend"] for r in rows} == {"torch-reference", "tvm-cpu", "tvm-cpu unfused", "ort-custom",
                                           "ort-custom unfused"}  # fmt: skip
    assert all(r["floor_ms"] > 0 and r["table"] == "fused" for r in rows)
    assert core.fused_scan_bytes(2, 6, 3, 5, 7, torch.float32) == 4 * (5 * 2 * 6 * 35 + 3 * 2 * 3 * 35)


def test_layer_profile_groups_operators():
    assert layer_profile.category("gspn::fused_scan") == "scans"
    assert layer_profile.category("aten::mkldnn_convolution") == "convolutions"
    assert layer_profile.category("aten::sigmoid") == "normalization and gating"
    assert layer_profile.category("aten::native_layer_norm") == "layer norm and GRN"
    totals = layer_profile.profile_layer(GSPN(4, fused=False), torch.randn(1, 4, 6, 6), runs=1)
    assert totals["scans"] > 0 and totals["convolutions"] > 0 and totals["normalization and gating"] > 0


def test_peak_resident_memory_is_the_workers_own_not_its_parents():
    """A worker started by a process holding 1 GiB reports its own peak (an interpreter importing
    the benchmark, torch included: about 300 MB), not the parent's: ``ru_maxrss`` would carry the parent's across
    ``execve`` (what the earlier tables reported)."""
    import subprocess
    import sys

    held = torch.ones(1 << 28)  # 1 GiB, touched
    code = "from gspn.bench import models; import numpy; print(models.resident_peak_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    worker_mb = float(done.stdout.strip().splitlines()[-1])
    print(f"worker peak {worker_mb:.0f} MB while the parent holds {held.numel() * 4 / 2**20:.0f} MiB")
    assert 10 < worker_mb < 768, worker_mb
