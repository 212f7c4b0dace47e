"""The TVM runtime's CPU thread pool, sized explicitly (standard library and ``tvm.runtime`` only).

TVM 0.27 sizes its pool by itself: ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) if set, else *half*
the hardware threads (it assumes hyper-threading), so a 2-core machine runs every TVM kernel on one
thread while torch uses two. The pool is per calling thread (``thread_local`` in the runtime), its
capacity is fixed when that thread first uses it, and the runtime reads the capacity from the
environment at that moment.

:func:`use_threads` makes the calling thread's pool run ``count`` threads:

1. ``TVM_NUM_THREADS`` is raised to ``max(count, os.cpu_count())`` (also when this module is
   imported), before the calling thread's pool exists, so the pool's capacity is never below what a
   later call may ask for (a pool created earlier keeps its capacity: the count it runs is then
   capped, and :func:`use_threads` returns the count it got);
2. the registered runtime function ``runtime.config_threadpool(mode=1 (big cores), count)`` sets the
   number of threads the pool uses, up to that capacity.

Thread pinning: unless the user set ``TVM_BIND_THREADS`` itself, it is set to ``0``, so TVM does not
pin its workers (nor the calling thread) to cores; torch and ONNX Runtime do not pin either, and a
pinned pool fights them for the same cores.

Torch's OpenMP pool: torch's intra-op threads (libgomp) spin-wait after each parallel region by
default, and on a busy machine those spinning threads, not TVM's pool (whose idle workers yield
the core), dominate. GSPN-T at 224x224, batch 1, torch eager, on a 2-core machine busy with other
processes: with the TVM kernels 2.5-5.3 s by default and 0.49-0.78 s with ``OMP_WAIT_POLICY=passive``;
with the reference kernels 2.7-4.6 s and 0.58-0.92 s. libgomp reads that variable when torch is
imported, so it is the user's (or the benchmark's) to set, before ``import torch``; this module
cannot.

The count is a plain argument: callers take it from torch (:mod:`gspn_tvm.kernels`,
:mod:`gspn_tvm.relax_frontend`); this module must not import torch (the runtime-only loader uses it).
"""

from __future__ import annotations

import os
import threading

import tvm.runtime

_applied = threading.local()


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def _reserve_capacity(count: int) -> None:
    """Raise ``TVM_NUM_THREADS`` (read by the runtime when a thread's pool is created) to ``count``."""
    capacity = max(count, os.cpu_count() or 1, _int_env("TVM_NUM_THREADS"))
    os.environ["TVM_NUM_THREADS"] = str(capacity)
    os.environ.setdefault("TVM_BIND_THREADS", "0")


_reserve_capacity(1)


def use_threads(count: int) -> int:
    """Make the TVM thread pool of the calling thread run ``count`` (>= 1) threads; returns the
    number it runs (less than ``count`` only where the pool was created earlier with a smaller
    capacity, outside this function). Cheap when ``count`` is the last count applied in this thread.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count: expected an int >= 1; got {type(count).__name__}")
    if count < 1:
        raise ValueError(f"count: expected an int >= 1; got {count}")
    if getattr(_applied, "count", None) == count:
        return _applied.running
    _reserve_capacity(count)
    tvm.get_global_func("runtime.config_threadpool")(1, count)
    _applied.count, _applied.running = count, tvm.runtime.num_threads()
    return _applied.running


def running_threads() -> int:
    """Threads the TVM pool of the calling thread runs now."""
    return tvm.runtime.num_threads()
