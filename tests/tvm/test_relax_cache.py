"""The Relax compile cache (``gspn_tvm.model_cache``, ``$GSPN_RELAX_CACHE_DIR``): a hit runs the same
code as a fresh compile, with the caller's weights; a damaged entry is rebuilt with a warning, never
loaded; another model or target misses."""

import logging

import numpy as np
import pytest
import torch
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.runtime.vm import VirtualMachine

from gspn_ref import GSPN
from gspn_tvm import compile_model, isa, model_cache, relax_frontend
from helpers import assert_close_scaled


def layer(seed: int, d_inner: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return GSPN(4, d_inner=d_inner, d_proxy=2, directions=("l2r",)).eval()


X = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def counted_compiles(monkeypatch, tmp_path):
    """A fresh cache folder; the list of ``tvm.compile`` calls made through ``relax_frontend``."""
    monkeypatch.setenv(model_cache.ENV_VAR, str(tmp_path / "relax"))
    calls = []
    real = tvm.compile

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(relax_frontend.tvm, "compile", counting)
    return calls


def entries(tmp_path):
    return sorted((tmp_path / "relax").rglob("*.so"))


def test_hit_runs_the_fresh_compile_with_the_callers_weights(counted_compiles, tmp_path):
    model = layer(1)
    fresh = compile_model(model, (X,), dynamic=False)  # miss: compiled now, run from memory, and cached
    assert len(counted_compiles) == 1 and len(entries(tmp_path)) == 1 and fresh._library_bytes is None
    hit = compile_model(model, (X,), dynamic=False)  # loaded from the entry: no compile
    assert len(counted_compiles) == 1 and hit._library_bytes == entries(tmp_path)[0].read_bytes()
    assert torch.equal(hit(X), fresh(X))  # the same code on the same weights
    other_weights = layer(2)
    other = compile_model(other_weights, (X,), dynamic=False)  # same structure: a hit, with these weights
    assert len(counted_compiles) == 1
    with torch.no_grad():
        expected = other_weights(X)
    assert not torch.allclose(fresh(X), expected)  # the weights differ: a stale result would show
    assert_close_scaled(other(X), expected, torch.float32, 20, "cache hit vs eager")
    artifact = other.save(tmp_path / "artifact")  # a cached library saves (its bytes) like a fresh one
    assert (artifact / "model.so").read_bytes() == entries(tmp_path)[0].read_bytes()


@I.ir_module
class Doubling:  # a one-operator Relax module: compiles in a fraction of a second
    @R.function
    def main(x: R.Tensor((4,), "float32")):
        return R.add(x, x)


def run_main(library, values: np.ndarray) -> np.ndarray:
    return VirtualMachine(library, tvm.cpu())["main"](tvm.runtime.tensor(values)).numpy()


LLVM = relax_frontend._as_target("llvm")


def cached(mod, compiles: list):
    def compile_fn():
        compiles.append(mod)
        return tvm.compile(mod, target=LLVM)

    return model_cache.compile_cached(mod, LLVM, compile_fn)


@pytest.mark.parametrize("damage", ["truncated to half", "one byte flipped in its code", "checksum file missing"])
def test_damaged_entry_is_rebuilt_with_a_warning_never_loaded(monkeypatch, tmp_path, caplog, damage):
    monkeypatch.setenv(model_cache.ENV_VAR, str(tmp_path / "relax"))
    mod, compiles, values = Doubling, [], np.arange(4, dtype=np.float32)
    cached(mod, compiles)
    (entry,) = entries(tmp_path)
    data = entry.read_bytes()
    if damage == "truncated to half":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "one byte flipped in its code":
        entry.write_bytes(data[:4096] + bytes([data[4096] ^ 0xFF]) + data[4097:])
    else:
        entry.with_name(entry.name + ".sha256").unlink()
    real_load = model_cache._load_bytes
    loaded = []
    monkeypatch.setattr(model_cache, "_load_bytes", lambda blob: loaded.append(blob) or real_load(blob))
    with caplog.at_level(logging.WARNING, logger="gspn_tvm.model_cache"):
        library, library_bytes, executable = cached(mod, compiles)
    assert loaded == [] and len(compiles) == 2 and library_bytes is None  # rebuilt; nothing loaded from the entry
    assert f"Relax cache entry {entry} is unusable" in caplog.text and "rebuilding it" in caplog.text
    np.testing.assert_array_equal(run_main(library, values), 2 * values)
    library, library_bytes, executable = cached(mod, compiles)  # the rebuilt entry is whole: a hit
    assert len(compiles) == 2 and executable is None
    assert loaded == [library_bytes] and library_bytes == entry.read_bytes()
    np.testing.assert_array_equal(run_main(library, values), 2 * values)


def test_unset_variable_caches_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(model_cache.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert model_cache.cache_dir() is None
    compiles = []
    library, library_bytes, executable = cached(Doubling, compiles)
    assert len(compiles) == 1 and library is executable and library_bytes is None
    assert not list(tmp_path.rglob("*"))


def test_another_model_or_target_misses_the_same_weights_hit():
    def module_of(model, target="llvm"):
        program = torch.export.export(model, (X,))
        emitter = relax_frontend.ScanEmitter(relax_frontend._as_target(target))
        mod = relax_frontend.from_exported_program(
            program, keep_params_as_input=True, unwrap_unit_return_tuple=True,
            custom_convert_map={relax_frontend.TORCH_FUSED_SCAN_OP: emitter.torch_converter(fused=True),
                                relax_frontend.TORCH_SCAN_OP: emitter.torch_converter()})  # fmt: skip
        return relax_frontend.detach_params(mod)[0]

    llvm = relax_frontend._as_target("llvm")
    key = model_cache.entry_key(module_of(layer(1)), llvm)
    assert model_cache.entry_key(module_of(layer(2)), llvm) == key  # weights are not in the key
    assert model_cache.entry_key(module_of(layer(1, d_inner=12)), llvm) != key  # another model
    level = next(level for level in isa.LEVELS if level != str(llvm.attrs["mcpu"]))
    other = relax_frontend._as_target({"kind": "llvm", "mcpu": level})
    assert model_cache.entry_key(module_of(layer(1)), other) != key  # another target
    mod = module_of(layer(1))
    with tvm.transform.PassContext(config={"tirx.disable_vectorize": True}):
        assert model_cache.entry_key(mod, llvm) != key  # other compiler settings
