"""Hypothesis profiles: ``ci`` (bounded, deterministic, no deadline; used by ``make test``) and ``dev``.

Tests are grouped by package (``ref/``, ``tvm/``, ``export/``), with the cross-backend suite in
``backends/`` and the front door at the top; every test module imports the shared test helpers
the same way, ``from helpers import ...`` (this folder is put on the import path here).
"""

import os
import sys
from pathlib import Path

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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
