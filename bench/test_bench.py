"""pytest-benchmark entry points for the same cases the harness runs.

``pytest bench/test_bench.py`` (add ``--benchmark-disable`` to run each once as a smoke test).
"""
from __future__ import annotations

import pytest
import torch

from bench.cases import all_cases
from bench.harness import _call, _leaves

_DEVICE = torch.device("cpu")
_PARAMS = [
    pytest.param(case, impl, mode, id=f"{case.op}[{case.config}]-{impl}-{mode}")
    for case in all_cases()
    for impl in case.impls
    for mode in (("fwd", "fwd+bwd") if case.backward else ("fwd",))
]


@pytest.mark.parametrize("case,impl,mode", _PARAMS)
def test_bench(benchmark, case, impl, mode):
    torch.set_num_threads(2)
    args, kwargs = case.make_inputs(_DEVICE)
    fn = case.impls[impl]
    leaves = _leaves(args, kwargs)
    benchmark(lambda: _call(fn, args, kwargs, mode, leaves))
