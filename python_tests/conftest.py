"""Shared pytest configuration: CUDA tests are marked ``cuda`` and skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

import prefcore  # noqa: F401  (import fails loudly if the extension is not built)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
