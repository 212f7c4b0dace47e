"""Heatmap PNGs: valid files whose pixels follow the affinity (directional maps are one-sided)."""

import struct
import zlib

import torch

from gspn_ref import GSPN
from gspn_ref.visualize import affinity_heatmaps, synthetic_image


def read_png(path):
    """Decode the 8-bit RGB, filter-0 PNGs that ``write_png`` produces: ``(H, W, 3)`` uint8."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    W, H = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    rows = [raw[r * (3 * W + 1) + 1 : (r + 1) * (3 * W + 1)] for r in range(H)]
    return torch.tensor(list(b"".join(rows)), dtype=torch.uint8).reshape(H, W, 3)


def test_heatmaps_are_written_and_directional(tmp_path):
    torch.manual_seed(0)
    size, (i, j) = 12, (6, 5)
    paths = affinity_heatmaps(GSPN(3, d_inner=4, d_proxy=2), synthetic_image(size), (i, j), tmp_path, scale=1)
    assert set(paths) == {"t2b", "b2t", "l2r", "r2l", "aggregated", "panel"}
    background = torch.tensor([68, 1, 84], dtype=torch.uint8)  # colour of zero affinity
    t2b = read_png(paths["t2b"])
    assert t2b.shape == (size, size, 3)
    assert (t2b[i + 1 :] == background).all()  # nothing below the output row reaches it in t2b
    assert not (t2b[:i] == background).all()
    r2l = read_png(paths["r2l"])
    assert (r2l[:, :j] == background).all() and not (r2l[:, j + 1 :] == background).all()
    panel = read_png(paths["panel"])
    assert panel.shape == (size, 5 * size + 4, 3)


def test_heatmaps_leave_the_callers_layer_unchanged(tmp_path):
    """The float64 evaluation runs on a copy: dtype, values, parameter objects and mode are the caller's."""
    torch.manual_seed(1)
    layer = GSPN(3, d_inner=4, d_proxy=2).train()
    params = dict(layer.named_parameters())
    before = {name: t.detach().clone() for name, t in layer.state_dict().items()}
    affinity_heatmaps(layer, synthetic_image(6), (2, 3), tmp_path, scale=1)
    assert layer.training, "the caller's layer was switched to eval mode"
    assert dict(layer.named_parameters()) == params
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype, f"{name}: dtype {value.dtype} became {after[name].dtype}"
        assert torch.equal(after[name], value), f"{name}: values changed"
    assert all(p.dtype == torch.float32 for p in layer.parameters())
