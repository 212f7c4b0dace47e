"""``gspn_tvm.enable``/``disable``/``enabled``/``is_enabled``: which kernels serve gspn::scan."""

import pytest
import torch

import gspn_tvm
from gspn_tvm import kernels


def _spy(monkeypatch):
    calls = []
    original = kernels.scan_forward
    monkeypatch.setattr(kernels, "scan_forward", lambda *a: calls.append(a[5]) or original(*a))
    return calls


def test_enabled_restores_the_previous_state(monkeypatch):
    calls = _spy(monkeypatch)
    x = torch.randn(1, 2, 3, 4)
    w = torch.full((1, 2, 3, 4), 0.25)
    gspn_tvm.disable()
    with gspn_tvm.enabled():
        assert gspn_tvm.is_enabled("cpu")
        torch.ops.gspn.scan(x, x, w, w, w, "t2b", 0)
        with gspn_tvm.enabled(False):
            assert not gspn_tvm.is_enabled("cpu")
            torch.ops.gspn.scan(x, x, w, w, w, "b2t", 0)
        assert gspn_tvm.is_enabled("cpu")
    assert not gspn_tvm.is_enabled("cpu")
    torch.ops.gspn.scan(x, x, w, w, w, "l2r", 0)
    assert calls == ["t2b"], "only the call inside enabled() (and not inside enabled(False)) runs TVM"


def test_enabled_restores_after_an_error():
    gspn_tvm.enable()
    try:
        with pytest.raises(ZeroDivisionError), gspn_tvm.enabled(False):
            assert not gspn_tvm.is_enabled("cpu")
            1 / 0  # noqa: B018
        assert gspn_tvm.is_enabled("cpu")
    finally:
        gspn_tvm.disable()
