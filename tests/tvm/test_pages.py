"""Huge pages for the TVM kernels' large CPU outputs (:mod:`gspn_tvm.pages`)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import gspn_tvm
from gspn_tvm import kernels, pages

HUGE = pages.HUGE_PAGE_BYTES


@given(address=st.integers(0, 2**47), nbytes=st.integers(0, 64 * HUGE))
def test_huge_page_span_is_every_whole_huge_page_inside_the_range(address, nbytes):
    start, length = pages.huge_page_span(address, nbytes)
    assert length >= 0 and length % HUGE == 0
    if length:
        assert start % HUGE == 0 and address <= start and start + length <= address + nbytes
        # maximal: less than one huge page is left out at either end
        assert start - address < HUGE and address + nbytes - (start + length) < HUGE
    else:  # no whole huge page fits
        first = -(-address // HUGE) * HUGE
        assert first + HUGE > address + nbytes


def test_huge_page_span_examples():
    assert pages.huge_page_span(HUGE, 3 * HUGE) == (HUGE, 3 * HUGE)
    assert pages.huge_page_span(HUGE + 64, 3 * HUGE) == (2 * HUGE, 2 * HUGE)
    assert pages.huge_page_span(HUGE + 64, HUGE) == (2 * HUGE, 0)


def test_small_meta_and_disabled_tensors_are_not_advised(monkeypatch):
    assert not pages.advise(torch.empty(pages.MIN_BYTES // 4 - 1))
    assert not pages.advise(torch.empty(2 * pages.MIN_BYTES, device="meta"))
    monkeypatch.setenv("GSPN_HUGE_PAGES", "0")
    assert not pages.enabled()
    assert not pages.advise(torch.empty(2 * pages.MIN_BYTES // 4))


def _mapping_of(address: int) -> dict:
    """The /proc/self/smaps entry (its fields and ``VmFlags``) of the mapping holding ``address``."""
    entry, found = {}, None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            if found:
                return found
            low, high = (int(v, 16) for v in head[0].split("-"))
            entry = {"range": (low, high)}
            found = entry if low <= address < high else None
        elif head[0] == "VmFlags:":
            entry["VmFlags"] = head[1:]
        else:
            entry[head[0].rstrip(":")] = head[1]
    return found or {}


def test_a_kernel_output_is_advised_huge_pages_before_it_is_written():
    """The forward's 16 MiB output: its whole huge pages are one mapping marked ``hg``
    (``MADV_HUGEPAGE``) by the time the kernel returns, and hold the scan's values."""
    B, C, H, W = 1, 4, 1024, 1024
    gen = torch.Generator().manual_seed(0)
    x, lam = torch.randn(2, B, C, H, W, generator=gen)
    gl, gm, gr = torch.rand(3, B, C, H, W, generator=gen) / 3
    with gspn_tvm.enabled():
        h = kernels.scan_forward(x, lam, gl, gm, gr, "t2b", 0)
    start, length = pages.huge_page_span(h.untyped_storage().data_ptr(), h.untyped_storage().nbytes())
    assert length >= 6 * HUGE, length
    mapping = _mapping_of(start)
    print({k: v for k, v in mapping.items() if k in ("range", "AnonHugePages", "VmFlags")})
    assert "hg" in mapping["VmFlags"], mapping
    from gspn_ref import gspn_scan_ref

    torch.testing.assert_close(h, gspn_scan_ref(x, lam, gl, gm, gr, "t2b", 0), rtol=1e-5, atol=1e-5)


def test_huge_pages_can_be_turned_off(monkeypatch):
    """With ``GSPN_HUGE_PAGES=0`` a fresh output is left as glibc maps it (48 MiB: above glibc's
    largest mmap threshold, so always a new mapping, never memory an earlier test advised)."""
    monkeypatch.setenv("GSPN_HUGE_PAGES", "0")
    out = pages.empty_like(torch.empty(48 << 18))
    start, length = pages.huge_page_span(out.untyped_storage().data_ptr(), out.untyped_storage().nbytes())
    assert length > 0
    assert "hg" not in _mapping_of(start)["VmFlags"], "advised although GSPN_HUGE_PAGES=0"
