"""Transparent huge pages for the large CPU outputs of the TVM kernels (Linux; torch and ctypes).

A kernel's fresh output is memory the process has never touched: glibc maps every allocation over
32 MiB afresh (``mmap``) and frees it back to the system, and Linux then faults it in one 4 KiB page
at a time, zeroing each, inside the kernel's first stores. At ``(2, 8, 1024, 1024)`` float32 that is
16,384 faults per 64 MiB tensor, about 1.1 us each on the 2-core EPYC VM of the benchmarks: the
adjoint's five gradients cost ~90 ms of faults against ~40 ms of scan (operator 137 ms, kernel into
existing tensors 43 ms, ``t2b``). When the tensor's range is advised ``MADV_HUGEPAGE`` before its
first touch, Linux (transparent huge pages in ``always`` or ``madvise`` mode) backs each whole 2 MiB
of it with one huge page: 512x fewer faults, and the column kernels, which touch every 4 KiB row of
a 1024-wide plane per tile, miss the TLB far less. Same machine, operator, ms: adjoint ``t2b`` 137
-> 52, ``l2r`` 161 -> 102, ``r2l`` 169 -> 93 (torch's ``THP_MEM_ALLOC_ENABLE=1``, which advises every
allocation of torch's, measured the same).

:func:`empty_like` is ``torch.empty_like`` plus that advice for CPU tensors of at least
:data:`MIN_BYTES`; smaller ones mostly reuse memory glibc already holds. Nothing changes where THP
is ``never`` or off Linux. ``GSPN_HUGE_PAGES=0`` turns it off: with THP's ``defrag`` set to
``madvise`` (a common default) a fault in an advised range may compact memory synchronously when no
huge page is free, a latency some services prefer not to risk.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
#: Tensors smaller than two huge pages are left alone.
MIN_BYTES = 2 * HUGE_PAGE_BYTES
#: ``MADV_HUGEPAGE`` of ``<sys/mman.h>`` (Linux, every architecture).
MADV_HUGEPAGE = 14

_madvise = None


def enabled() -> bool:
    """False when the environment says ``GSPN_HUGE_PAGES=0``."""
    return os.environ.get("GSPN_HUGE_PAGES", "1") != "0"


def huge_page_span(address: int, nbytes: int) -> tuple[int, int]:
    """``(start, length)`` of the whole huge pages inside ``[address, address + nbytes)``; length 0
    when it holds none (advising more would change memory that is not the tensor's)."""
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return start, max(0, end - start)


def _libc_madvise():
    """libc's ``madvise``, or None off Linux."""
    global _madvise
    if _madvise is None:
        if sys.platform.startswith("linux"):
            function = ctypes.CDLL(None, use_errno=True).madvise
            function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            function.restype = ctypes.c_int
            _madvise = function
        else:
            _madvise = False
    return _madvise or None


def advise(tensor: torch.Tensor) -> bool:
    """Advise the whole huge pages of ``tensor``'s storage ``MADV_HUGEPAGE``; True when advised
    (a CPU tensor of at least :data:`MIN_BYTES` on Linux, :func:`enabled`, and ``madvise`` accepted)."""
    if tensor.device.type != "cpu" or not enabled():
        return False
    storage = tensor.untyped_storage()
    if storage.nbytes() < MIN_BYTES:
        return False
    madvise = _libc_madvise()
    start, length = huge_page_span(storage.data_ptr(), storage.nbytes())
    if madvise is None or length == 0:
        return False
    return madvise(start, length, MADV_HUGEPAGE) == 0


def empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(tensor)``, its huge pages advised before anything touches it (:func:`advise`)."""
    out = torch.empty_like(tensor)
    advise(out)
    return out
