"""The copies of the original code's outputs that travel with the package are the ones the
project was given (``shared/conformance``): their sha256 digests are pinned here."""

import hashlib
from pathlib import Path

import pytest

import gspn_ref

PINNED = {
    "official_l2r_vectors.npz": "c031b21a44eefc94c3d77fa7fbac8170d532650e0d1cdd969bd13d15b24f0a89",
    "official_gspn_tiny16.npz": "67b4d087318248c212c676310e3c4df92bf2ead84b0138ad5d004be95eab66bd",
}
TESTS_PINNED = {"official_gspn_archs.json": "8953636b1bca2bf4a52e07ce82d093ee9ddd0dccb55a7580709f2e4b9c8f3f90"}


@pytest.mark.parametrize("folder, name, digest", [
    *((Path(gspn_ref.__file__).parent / "data", n, d) for n, d in PINNED.items()),
    *((Path(__file__).resolve().parents[1] / "data", n, d) for n, d in TESTS_PINNED.items()),
], ids=lambda v: v if isinstance(v, str) and "." in v else "")  # fmt: skip
def test_conformance_file_is_the_given_one(folder, name, digest):
    assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{folder / name} was changed"
