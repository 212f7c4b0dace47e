"""The paper's networks (gspn_ref.models) against the original code's vectors, configs and checkpoints.

``gspn_ref/data/official_gspn_tiny16.npz`` and ``official_gspn_archs.json`` are copies of
``shared/conformance`` (see ``OFFICIAL_MODEL.md`` there): the original network run on CPU, and the
original full architectures' state-dict layouts.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn_ref import gspn_fused_scan, gspn_scan
from gspn_ref.models import (
    DEFAULT_CONFIG,
    StateDictMismatchError,
    UnsafeCheckpointError,
    from_official_config,
    gspn_base,
    gspn_small,
    gspn_tiny,
    load_official_checkpoint,
    official_config,
    read_checkpoint,
)
from gspn_ref.testing import official_network_state, official_network_vectors

DATA = Path(__file__).resolve().parents[1] / "data"  # official_gspn_archs.json

# OFFICIAL_MODEL.md section 12: the official float32 run is within 4e-6 (logits), 3e-6 (first mixer)
# and 4e-5 (layer3, values up to ~10) of its own float64 run; a float32 port carries rounding errors
# of that order too, so each bound is that error with a ~10x margin for a different summation order.
# A real mistake (eps, GELU variant, chunking, direction, layout) moves the logits by 2e-3 to 1.6.
FLOAT32_ATOL = {
    "patch_embed_output": 5e-5,
    "block0_op_output": 5e-5,
    "layer0_output": 1e-4,
    "layer1_output": 1e-4,
    "layer2_output": 1e-4,
    "layer3_output": 5e-4,
    "logits": 1e-4,
}
FLOAT64_ATOL = 1e-9  # float64 port vs the official float64 logits (section 12)


@pytest.fixture(scope="module")
def vectors():
    return official_network_vectors()


@pytest.fixture(scope="module")
def official_state(vectors):
    return official_network_state(vectors)


@pytest.fixture(scope="module")
def tiny16(vectors, official_state):
    """The tiny16 network of the vectors, official weights loaded strictly, in eval mode."""
    model = from_official_config(json.loads(str(vectors["config"])))
    model.load_state_dict(official_state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def archs():
    return json.loads((DATA / "official_gspn_archs.json").read_text())["archs"]


def _max_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(actual.shape) == expected.shape
    return (actual.double() - torch.from_numpy(expected).double()).abs().max().item()


# --- conformance with the original network -------------------------------------------------------


def test_state_dict_layout_matches_the_original(tiny16, official_state):
    assert [(k, tuple(v.shape)) for k, v in tiny16.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in official_state.items()
    ]
    assert list(tiny16.buffers()) == []


def test_tiny16_logits_and_every_intermediate_match_float32(tiny16, vectors):
    x = torch.from_numpy(vectors["input"])
    errors = {}
    with torch.no_grad():
        h = tiny16.patch_embed(x)
        errors["patch_embed_output"] = _max_error(h, vectors["patch_embed_output"])
        block0 = tiny16.layers[0].blocks[0]
        assert _max_error(block0.norm(h), vectors["block0_op_input"]) <= FLOAT32_ATOL["patch_embed_output"]
        op_out = block0.op(torch.from_numpy(vectors["block0_op_input"]))
        errors["block0_op_output"] = _max_error(op_out, vectors["block0_op_output"])
        for i, stage in enumerate(tiny16.layers):
            h = stage(h)
            errors[f"layer{i}_output"] = _max_error(h, vectors[f"layer{i}_output"])
        logits = tiny16(x)
    errors["logits"] = _max_error(logits, vectors["logits"])
    assert logits.dtype == torch.float32
    failed = {k: v for k, v in errors.items() if not v <= FLOAT32_ATOL[k]}
    assert not failed, f"beyond tolerance: {failed}; all: {errors}"


def test_tiny16_float64_logits(tiny16, vectors):
    model = copy.deepcopy(tiny16).double()
    with torch.no_grad():
        logits = model(torch.from_numpy(vectors["input"]).double())
    assert logits.dtype == torch.float64
    assert _max_error(logits, vectors["logits_float64"]) <= FLOAT64_ATOL


def test_tiny16_block_chunks(tiny16, vectors):
    assert tiny16.block_chunks() == json.loads(str(vectors["blocks"]))


@pytest.mark.parametrize("side", [1, 2, 3, 8])
def test_fused_scan_equals_the_originals_normalization_and_gating(tiny16, side):
    """The mixer's one fused scan equals the original's separate steps (its own normalization with
    the row-0 / row-N-1 / N == 1 rules of OFFICIAL_MODEL.md section 4, the scan, gate and skip)."""
    mixer = tiny16.layers[1].blocks[0].op
    x = torch.randn(2, mixer.dim, side, side, generator=torch.Generator().manual_seed(side))
    with torch.no_grad():
        frames, lam, gl, gm, gr, gate, skip = mixer.scan_inputs(x)
        separate = gspn_scan(frames, lam, gl, gm, gr, "l2r", mixer.items_each_chunk) * gate + frames * skip
        fused = gspn_fused_scan(*mixer.raw_scan_inputs(x), "l2r", mixer.items_each_chunk)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [1, 2, 5, 8])
def test_mixer_runs_the_originals_column_scan_transposed(tiny16, side):
    """forward scans every map transposed, top to bottom; it equals the original's order of work
    written out here: its frames scanned left to right, mixed by m_conv in their frames, out_norm,
    GRN (non-zero gamma and beta, so that its sum over the map is exercised) and out_proj."""
    mixer = copy.deepcopy(tiny16.layers[1].blocks[0].op)
    generator = torch.Generator().manual_seed(side)
    with torch.no_grad():
        mixer.grn.gamma.copy_(torch.randn(mixer.grn.gamma.shape, generator=generator))
        mixer.grn.beta.copy_(torch.randn(mixer.grn.beta.shape, generator=generator))
        x = torch.randn(2, mixer.dim, side, side, generator=generator)
        frames, lam, al, am, ar, gate, skip = mixer.raw_scan_inputs(x)
        y = gspn_fused_scan(frames, lam, al, am, ar, gate, skip, "l2r", mixer.items_each_chunk)
        B, D = y.shape[0], mixer.d_inner
        y = mixer.m_conv(y.reshape(B, 4, D * side, side)).reshape(B, D, side, side)
        expected = mixer.out_proj(mixer.grn(mixer.out_norm(y)))
        actual = mixer(x)
    print("max |forward - original order|:", (actual - expected).abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_transposed_scan_inputs_are_the_transposes(tiny16):
    """raw_scan_inputs(transposed=True) is raw_scan_inputs() with every map transposed."""
    mixer = tiny16.layers[1].blocks[0].op
    x = torch.randn(1, mixer.dim, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for plain, transposed in zip(mixer.raw_scan_inputs(x), mixer.raw_scan_inputs(x, transposed=True)):
            torch.testing.assert_close(transposed, plain.transpose(2, 3), rtol=1e-6, atol=1e-6)


def test_one_scan_call_equals_four_directional_scans_in_the_original_frame(tiny16, vectors):
    """OFFICIAL_MODEL.md section 5: frame k scanned left to right equals T_k of the SPEC scan in
    direction (l2r, t2b, r2l, b2t)[k] of u, with the maps brought back by T_k^-1."""
    mixer = tiny16.layers[1].blocks[0].op  # chunk 2 on an 8 x 8 map: local propagation
    x = torch.randn(2, mixer.dim, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frames, lam, gl, gm, gr, _, _ = mixer.scan_inputs(x)
        stacked = gspn_scan(frames, lam, gl, gm, gr, "l2r", mixer.items_each_chunk)
    D = mixer.d_inner
    u = frames[:, :D]
    forward = [lambda t: t, lambda t: t.transpose(2, 3), lambda t: t.flip(-1), lambda t: t.transpose(2, 3).flip(-1)]
    inverse = [lambda t: t, lambda t: t.transpose(2, 3), lambda t: t.flip(-1), lambda t: t.flip(-1).transpose(2, 3)]
    for k, direction in enumerate(("l2r", "t2b", "r2l", "b2t")):
        part = slice(k * D, (k + 1) * D)
        maps = [inverse[k](t[:, part]) for t in (lam, gl, gm, gr)]
        h_k = forward[k](gspn_scan(u, *maps, direction, mixer.items_each_chunk))
        torch.testing.assert_close(stacked[:, part], h_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [gspn_tiny, gspn_small, gspn_base], ids=["tiny", "small", "base"])
def test_full_architectures_match_the_original(build, archs):
    expected = archs[build.__name__.split("_")[1]]
    with torch.device("meta"):
        model = build()
        from_config = from_official_config(expected["config"])
    layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert layout == expected["state_dict"]
    assert len(layout) == expected["state_dict_entries"]
    assert sum(p.numel() for p in model.parameters()) == expected["param_count"]
    for group, count in expected["param_count_by_group"].items():
        assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(group + ".")) == count, group
    assert sum(b.numel() for b in model.buffers()) == expected["buffer_count"]
    assert model.block_chunks() == expected["blocks"]
    assert from_config.config == model.config
    assert [[k, list(v.shape)] for k, v in from_config.state_dict().items()] == layout


# --- inputs the original cannot take ---------------------------------------------------------------


def test_non_square_input_is_refused_with_the_reason(tiny16):
    with pytest.raises(ValueError, match=r"x: expected a square map \(H == W\); got 64 x 48.*transpose"):
        tiny16(torch.randn(1, 3, 64, 48))
    mixer = tiny16.layers[0].blocks[0].op
    with pytest.raises(ValueError, match=r"got 8 x 6"):
        mixer(torch.randn(1, mixer.dim, 8, 6))


def test_other_square_sizes_run():
    model = gspn_tiny(num_classes=3, embed_dim=8, depths=[1, 1, 1, 1], d_state=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 3)
    assert [b["items_each_chunk"] for b in model.block_chunks()] == [2, 2, 14, 7]


# --- configs ---------------------------------------------------------------------------------------

TINY_YAML = """\
MODEL:
  TYPE: gspn
  NAME: gspn_tiny
  DROP_PATH_RATE: 0.2
  GSPN:
    EMBED_DIM: 96
    DEPTHS: [ 2, 2, 7, 2 ]
    D_STATE: 8
    RATIO: 1.5
    CONV: 7
    CONV_BIAS: false
    ITEMS_EACH_CHUNK: 2
    NORM_LAYER: "ln2d"
    PATCHEMBED: "v2"
    DOWNSAMPLE: "v3"
TRAIN:
  EPOCHS: 300
"""


def test_yaml_config_fills_the_original_defaults(tmp_path, archs):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    config = official_config(path)
    assert config == archs["tiny"]["config"]
    assert config["MODEL"]["GSPN"]["FEAT_SIZE"] == DEFAULT_CONFIG["MODEL"]["GSPN"]["FEAT_SIZE"]
    with torch.device("meta"):
        model = from_official_config(str(path), num_classes=10)
    assert model.classifier.head.out_features == 10
    assert [b["items_each_chunk"] for b in model.block_chunks()] == [b["items_each_chunk"] for b in archs["tiny"]["blocks"]]


def test_yaml_base_files_are_followed(tmp_path):
    (tmp_path / "base.yaml").write_text("MODEL:\n  GSPN:\n    EMBED_DIM: 32\n    D_STATE: 4\n    NORM_LAYER: ln2d\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nMODEL:\n  NUM_CLASSES: 7\n  GSPN:\n    D_STATE: 6\n")
    config = official_config(tmp_path / "child.yaml")
    assert (config["MODEL"]["GSPN"]["EMBED_DIM"], config["MODEL"]["GSPN"]["D_STATE"]) == (32, 6)
    assert config["MODEL"]["NUM_CLASSES"] == 7


def test_dict_config_fills_defaults_and_overrides_apply():
    config = official_config({"MODEL": {"GSPN": {"EMBED_DIM": 48, "NORM_LAYER": "ln2d"}}, "AUG": {"MIXUP": 0.8}}, depths=(1, 1, 2, 1))
    g = config["MODEL"]["GSPN"]
    assert (g["EMBED_DIM"], g["DEPTHS"], g["D_STATE"], g["RATIO"], g["DOWNSAMPLE"]) == (48, [1, 1, 2, 1], 16, 2.0, "v2")
    assert config["MODEL"]["NUM_CLASSES"] == 1000 and config["DATA"]["IMG_SIZE"] == 224
    assert "AUG" not in config


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"MODEL\.GSPN\.EMBED_DIMS: not a key of the original config"):
        official_config({"MODEL": {"GSPN": {"EMBED_DIMS": 96}}})
    with pytest.raises(ValueError, match=r"MODEL\.GSPN\.NORM_LAYER: .*'ln'.*channel-first"):
        official_config()  # the config.py default "ln" cannot run
    with pytest.raises(TypeError, match=r"MODEL\.GSPN\.EMBED_DIM: expected an int >= 1; got str '96'"):
        official_config(RUNNABLE_DEFAULTS, embed_dim="96")
    with pytest.raises(ValueError, match=r"MODEL\.GSPN\.FEAT_SIZE: expected at least one entry per stage \(5\)"):
        official_config(RUNNABLE_DEFAULTS, depths=[1, 1, 1, 1, 1])
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'classes'"):
        gspn_tiny(classes=10)
    with pytest.raises(ValueError, match=r"cfg: expected the path of an original YAML config file"):
        official_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"MODEL\.GSPN\.DOWNSAMPLE: expected one of v1, v2, v3"):
        official_config(RUNNABLE_DEFAULTS, downsample="none")


RUNNABLE_DEFAULTS = {"MODEL": {"GSPN": {"NORM_LAYER": "ln2d"}}}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(patchembed="v1", downsample="v1"),
        dict(downsample="v2", posembed=True, img_size=32, gmlp=True, norm_layer="bn", patch_norm=False),
    ],
    ids=["v1-embed-v1-down", "v2-down-posembed-gmlp-bn"],
)
def test_other_module_versions_build_run_and_train(overrides):
    model = from_official_config(
        RUNNABLE_DEFAULTS, num_classes=5, embed_dim=8, depths=[1, 1, 1, 1], d_state=4, drop_path_rate=0.5, **overrides
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    model(x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)


def test_downsample_v1_refuses_odd_sides():
    model = from_official_config(RUNNABLE_DEFAULTS, embed_dim=8, depths=[1, 1, 1, 1], d_state=4, downsample="v1").eval()
    with pytest.raises(ValueError, match=r"downsampling v1 needs an even side; got 9 x 9"):
        model(torch.randn(1, 3, 36, 36))


# --- checkpoints -----------------------------------------------------------------------------------


def _fake_yacs_module():
    """A module named like yacs's, whose CfgNode pickles as yacs's does (a dict subclass, state in __dict__)."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None, key_list=None, new_allowed=False):
            super().__init__()
            for key, value in (init_dict or {}).items():
                self[key] = CfgNode(value) if isinstance(value, dict) else value
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = new_allowed

        def freeze(self):
            self.__dict__["__immutable__"] = True

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    package = types.ModuleType("yacs")
    package.config = module
    return package, module


def _training_checkpoint(model, config, monkeypatch):
    """A checkpoint dict as the original main.py writes it, config as a (fake) yacs CfgNode."""
    package, module = _fake_yacs_module()
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    full_config = {**config, "TRAIN": {**config["TRAIN"], "EPOCHS": 300, "BASE_LR": 5e-4}, "AUG": {"MIXUP": 0.8}}
    cfg = module.CfgNode(full_config)
    cfg.freeze()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # zero grads: weights unchanged
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": {"t_initial": 300, "warmup_t": 20, "base_values": [5e-4], "noise_range_t": None},
        "max_accuracy": 81.2,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0},
        "epoch": 3,
        "config": cfg,
        "model_ema": ema,
        "max_accuray_ema": 81.5,
    }


def test_training_checkpoint_round_trips_without_unpickling_code(tmp_path, monkeypatch, tiny16, vectors):
    path = tmp_path / "ckpt_epoch_3.pth"
    with monkeypatch.context() as patch:
        checkpoint = _training_checkpoint(copy.deepcopy(tiny16), tiny16.config, patch)
        torch.save(checkpoint, path)
    assert "yacs" not in sys.modules  # the reader must not need (or import) the config's class
    with pytest.raises(pickle.UnpicklingError, match="yacs.config.CfgNode"):
        torch.load(path, weights_only=True)  # why the restricted reader exists

    x = torch.from_numpy(vectors["input"])
    loaded = load_official_checkpoint(path).eval()
    with torch.no_grad():
        expected, actual = tiny16(x), loaded(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert loaded.config == tiny16.config

    raw = read_checkpoint(path)
    assert type(raw["config"]) is dict and type(raw["config"]["MODEL"]["GSPN"]) is dict
    assert raw["config"]["AUG"] == {"MIXUP": 0.8} and raw["epoch"] == 3 and raw["max_accuray_ema"] == 81.5
    assert set(raw["optimizer"]) == {"state", "param_groups"}

    ema_model = load_official_checkpoint(path, ema=True).eval()
    reference = copy.deepcopy(tiny16)
    reference.load_state_dict(raw["model_ema"])
    with torch.no_grad():
        torch.testing.assert_close(ema_model(x), reference(x), rtol=0, atol=0)
        assert (ema_model(x) - expected).abs().max() > 1e-3


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("with_config", [False, True], ids=["payload-only", "payload-beside-yacs-config"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, tiny16, with_config):
    marker = tmp_path / "payload-ran"
    content = {"model": tiny16.state_dict(), "extra": _Payload(marker)}
    path = tmp_path / "evil.pth"
    with monkeypatch.context() as patch:
        if with_config:
            content["config"] = _training_checkpoint(copy.deepcopy(tiny16), tiny16.config, patch)["config"]
        torch.save(content, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth: refusing to unpickle the global (posix|nt)\.system"):
        load_official_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_file_with_payload_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle the global (posix|nt)\.system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_mismatched_state_dict_lists_the_first_bad_keys(tiny16, official_state):
    state = dict(official_state)
    del state["layers.0.blocks.0.op.m_conv.weight"]
    state["layers.0.blocks.0.op.extra.weight"] = torch.zeros(1)
    state["layers.1.blocks.0.op.conv2d.weight"] = torch.zeros(48, 1, 3, 3)
    with pytest.raises(StateDictMismatchError) as info:
        load_official_checkpoint({"model": state}, copy.deepcopy(tiny16))
    message = str(info.value)
    assert "missing keys 1: layers.0.blocks.0.op.m_conv.weight" in message
    assert "unexpected keys 1: layers.0.blocks.0.op.extra.weight" in message
    assert "mis-shaped keys 1: layers.1.blocks.0.op.conv2d.weight (48, 1, 3, 3) (network: (48, 1, 7, 7))" in message

    other_width = from_official_config(tiny16.config, embed_dim=24)
    with pytest.raises(StateDictMismatchError, match=r"mis-shaped keys 2\d\d: patch_embed\.0\.weight .*\(and 2\d\d more\)"):
        load_official_checkpoint(official_state, other_width)


def test_checkpoint_argument_errors(tiny16, official_state):
    with pytest.raises(ValueError, match=r"model: the checkpoint holds no 'config'"):
        load_official_checkpoint(official_state)
    with pytest.raises(ValueError, match=r"ema: True asks for checkpoint\['model_ema'\]"):
        load_official_checkpoint(official_state, copy.deepcopy(tiny16), ema=True)
    with pytest.raises(ValueError, match=r"expected a training checkpoint with 'model_ema'"):
        load_official_checkpoint({"model": official_state, "epoch": 1}, copy.deepcopy(tiny16), ema=True)
    with pytest.raises(TypeError, match=r"path_or_dict: expected a path or a dict; got int"):
        load_official_checkpoint(3)
    with pytest.raises(ValueError, match=r"path_or_dict: expected a checkpoint file or a dict"):
        load_official_checkpoint("/nonexistent/ckpt.pth")


def test_older_key_names_ddp_prefix_and_conv_shaped_linears_load(tiny16, official_state, vectors):
    legacy = {}
    for key, value in official_state.items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("classifier.head.", "head.")
        key = key.replace("classifier.norm.", "norm.").replace(".blocks.0.op.", ".blocks.0.self_attention.")
        if key.endswith("mlp.fc1.weight"):
            value = value[:, :, None, None]
        legacy["module." + key] = value
    model = load_official_checkpoint({"model": legacy}, from_official_config(tiny16.config)).eval()
    x = torch.from_numpy(vectors["input"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny16(x), rtol=0, atol=0)


# --- torch.compile and torch.export ----------------------------------------------------------------


def test_torch_export_has_one_scan_per_mixer_and_equals_eager(tiny16, vectors):
    x = torch.from_numpy(vectors["input"])
    program = torch.export.export(tiny16, (x,))
    # one fused scan per mixer (logits, gate and skip in), rows of the transposed maps (t2b); none of
    # tiny16's maps is 1 x 1
    fused = [n for n in program.graph.nodes if n.op == "call_function" and n.target == torch.ops.gspn.fused_scan.default]
    plain = [n for n in program.graph.nodes if n.op == "call_function" and n.target == torch.ops.gspn.scan.default]
    blocks = json.loads(str(vectors["blocks"]))
    assert not plain and [tuple(n.args[7:]) for n in fused] == [("t2b", b["items_each_chunk"]) for b in blocks]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), tiny16(x), rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_equals_eager(tiny16, vectors):
    torch._dynamo.reset()
    compiled = torch.compile(tiny16, fullgraph=True, backend="aot_eager")
    x = torch.from_numpy(vectors["input"])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), tiny16(x), rtol=1e-6, atol=1e-6)
        assert _max_error(compiled(x), vectors["logits"]) <= FLOAT32_ATOL["logits"]


def test_gradient_checkpointing_gives_the_same_gradients():
    kwargs = dict(num_classes=4, embed_dim=8, depths=[1, 1, 1, 1], d_state=4, drop_path_rate=0.0)
    plain = gspn_tiny(**kwargs).train()
    checkpointed = gspn_tiny(use_checkpoint=True, **kwargs).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert all(b.use_checkpoint for s in checkpointed.layers for b in s.blocks)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for model in (plain, checkpointed):
        model(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_import_gspn_ref_stays_cheap_and_exposes_models_lazily():
    code = (
        "import sys, gspn_ref; assert 'gspn_ref.models' not in sys.modules; "
        "assert gspn_ref.models.gspn_tiny is sys.modules['gspn_ref.models'].gspn_tiny"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
