"""Hypothesis profiles: ``ci`` (bounded, deterministic, no deadline; used by ``make test``) and ``dev``;
how the suite spreads over pytest-xdist workers (``make test`` runs ``-n auto --dist loadgroup``).

Tests are grouped by package (``ref/``, ``tvm/``, ``export/``), with the cross-backend suite in
``backends/`` and the front door at the top; every test module imports the shared test helpers
the same way, ``from helpers import ...`` (this folder is put on the import path here).

Parallel runs: tests that share what a module computes once (a module- or session-scoped fixture
of the suite, or a module-level cache named in ``SHARED_CACHE_MODULES``) run on one worker, so it
is still computed once; the tests that need gigabytes never run at the same time; the slowest
work is handed out first. Every test writes only under ``tmp_path`` (or through the kernel cache,
the session's Relax compile cache and the ONNX Runtime library build, which lock), so no other
coordination is needed.
"""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

try:  # pytest >= 9.2: structured node ids
    from _pytest.nodeid import NodeId
except ImportError:  # older pytest: xdist's own ``item._nodeid`` suffix works
    NodeId = None

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

# One Relax compile cache (gspn_tvm.model_cache) for the session, shared by the xdist workers and the
# processes the tests start (they inherit the variable): the demo and the README compile the same
# classifier once. Set by the controller before the workers start; removed when the session ends.
if not os.environ.get("PYTEST_XDIST_WORKER"):
    _RELAX_CACHE = tempfile.mkdtemp(prefix="gspn-relax-cache-")
    os.environ["GSPN_RELAX_CACHE_DIR"] = _RELAX_CACHE
    atexit.register(shutil.rmtree, _RELAX_CACHE, ignore_errors=True)

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


def _group_name(item) -> str | None:
    marks = item.iter_markers("xdist_group")
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks})
    return "_".join(names) or None


class _GroupSuffix:
    """Make sure a grouped test's node id ends in ``@<group>``: xdist's controller groups by that
    suffix alone. xdist 3.8 appends it through ``item._nodeid``, which pytest 9.2 no longer reads
    (the id is ``item._id``, a ``NodeId``), so the groups silently fell apart: module fixtures were
    computed on both workers (about 80 s of duplicate Relax compiles and ONNX exports)."""

    @pytest.hookimpl(trylast=True)  # after xdist's worker hook, which appends the suffix where it can
    def pytest_collection_modifyitems(self, config, items):
        for item in items:
            group = _group_name(item)
            if group is None or item.nodeid.endswith(f"@{group}"):
                continue
            if NodeId is None or not isinstance(getattr(item, "_id", None), NodeId):
                raise pytest.UsageError(f"{item.nodeid}: cannot attach its xdist group {group!r} to the node id "
                                        "(neither xdist nor tests/conftest.py knows this pytest's node ids)")
            item._id = NodeId.parse(f"{item.nodeid}@{group}")


def pytest_configure(config):
    # In an xdist worker under --dist loadgroup (xdist sets the option there).
    if getattr(config.option, "loadgroup", False) and os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(_GroupSuffix(), "gspn-xdist-group-suffix")
