"""Hypothesis profiles: ``ci`` (bounded, deterministic, no deadline; used by ``make test``) and ``dev``;
how the suite spreads over pytest-xdist workers (``make test`` runs ``-n auto --dist loadgroup``).

Tests are grouped by package (``ref/``, ``tvm/``, ``export/``), with the cross-backend suite in
``backends/`` and the front door at the top; every test module imports the shared test helpers
the same way, ``from helpers import ...`` (this folder is put on the import path here).

Parallel runs: tests that share what a module computes once (a module- or session-scoped fixture
of the suite, or a module-level cache named in ``SHARED_CACHE_MODULES``) run on one worker, so it
is still computed once; the tests that need gigabytes never run at the same time; the slowest
work is handed out first. Every test writes only under ``tmp_path`` (or through the kernel cache
and the ONNX Runtime library build, which lock), so no other coordination is needed.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Threads per process: the usable CPUs shared among the xdist workers (which set this variable), at
# most 2. Two workers of two threads each on two cores would oversubscribe: TVM's pool spins.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, usable_cpus() // max(1, _workers))))

# Test modules whose tests share a module-level cache (functools.lru_cache of compiled models).
SHARED_CACHE_MODULES = ("tests/backends/test_conformance.py", "tests/export/test_onnx_portable.py")
# Tests that each hold several GiB: one at a time (one group, so one worker runs them in turn).
LARGE_MEMORY_TESTS = (
    "tests/backends/test_large_sizes.py::test_tvm_forward_beyond_2_pow_31_elements",
    "tests/export/test_fuzz_onnx.py::test_element_count_beyond_2_31_uses_64_bit_offsets",
)
# The slowest work (about 10 s or more on 2 cores), started first so that no worker is left with
# it at the end: a node id, or a module for the group of tests that share its fixtures.
SLOW_FIRST = (
    "tests/test_cli.py::test_demo_runs_every_step",
    "tests/tvm/test_tvm_relax.py",
    "tests/backends/test_models_backends.py",
    "tests/test_readme.py::test_readme_usage_snippets_run",
    "tests/export/test_onnx_models.py",
    "tests/tvm/test_isa.py::test_baseline_kernels_run_and_match_the_reference",
    "tests/backends/test_large_sizes.py::test_tvm_forward_beyond_2_pow_31_elements",
    "tests/export/test_fuzz_onnx.py::test_element_count_beyond_2_31_uses_64_bit_offsets",
    "tests/tvm/test_artifacts.py",
    "tests/ref/test_ref_operator.py::test_torch_compile_inductor_matches_eager",
)


def _auto_workers() -> int:
    """``-n auto``: one worker per usable CPU (``$PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides), none on
    one CPU (where a worker only adds its start-up), at most 8 (each holds torch, TVM and ONNX Runtime)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cpus = usable_cpus()
    return 0 if cpus < 2 else min(cpus, 8)


@pytest.hookimpl(optionalhook=True)  # a hook of xdist: no error where xdist is absent or disabled
def pytest_xdist_auto_num_workers(config):
    return _auto_workers()


def _module_of(item) -> str:
    return item.nodeid.split("::", 1)[0]


def _uses_shared_fixture(item) -> bool:
    """True where ``item`` uses a fixture of this suite computed once per module or session."""
    fixture_info = getattr(item, "_fixtureinfo", None)
    if fixture_info is None:
        return False
    for name in item.fixturenames:
        definitions = fixture_info.name2fixturedefs.get(name) or ()
        for definition in definitions:
            module = getattr(definition.func, "__module__", "") or ""
            if definition.scope != "function" and not module.startswith(("_pytest", "pytest", "xdist")):
                return True
    return False


def _group_of(item) -> str | None:
    if item.nodeid.split("[", 1)[0] in LARGE_MEMORY_TESTS:
        return "large-memory"
    module = _module_of(item)
    if module in SHARED_CACHE_MODULES or _uses_shared_fixture(item):
        return module
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``: group the tests that share state (see the module docstring) and
    put the slowest first. Without xdist, the order is left as collected."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        group = None if item.get_closest_marker("xdist_group") else _group_of(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item) -> int:
        nodeid = item.nodeid.split("[", 1)[0]
        for position, slow in enumerate(SLOW_FIRST):
            if nodeid == slow or _module_of(item) == slow:
                return position
        return len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the collected order within each rank
