"""Shared pytest configuration: CUDA tests are marked ``cuda`` and skipped without a GPU;
hypothesis profiles for the property-based fuzz suite (python_tests/test_fuzz_ops.py).

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE``): ``default`` — a bounded number of
examples per test, so the fuzz file adds well under a minute on 2 cores; ``long`` — a deeper
run (``HYPOTHESIS_PROFILE=long pytest python_tests/test_fuzz_ops.py``). Neither keeps an example
database (``database=None``), so nothing is written into the repository.
"""
from __future__ import annotations

import os

import pytest
import torch

import prefcore  # noqa: F401  (import fails loudly if the extension is not built)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the fuzz suite itself imports hypothesis and fails loudly without it
    settings = None
if settings is not None:
    # default: the same examples on every run (CI must not turn red on a new draw); long: fresh draws
    _common = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
    settings.register_profile("default", max_examples=40, derandomize=True, **_common)
    settings.register_profile("long", max_examples=3000, derandomize=False, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        # By the marker itself: item.keywords would also match a test or parameter named "cuda".
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
