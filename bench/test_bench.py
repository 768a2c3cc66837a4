"""pytest-benchmark entry points for the same cases the harness runs, and checks of the harness.

``pytest bench/test_bench.py`` times every case at its DESIGN §5 size under pytest-benchmark.
With ``--benchmark-disable`` (the smoke run in ``make test``) each case runs once at its tiny
``smoke_inputs`` size instead, so the bench code is exercised in seconds and cannot rot; the
harness's own measuring, summarising and table code and ``tools/bench_table.py`` run on those
tiny cases too. Nothing here asserts a timing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import harness
from bench.cases import all_cases
from bench.harness import _call, _leaves

_DEVICE = torch.device("cpu")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PARAMS = [
    pytest.param(case, impl, mode, id=f"{case.op}[{case.config}]-{impl}-{mode}")
    for case in all_cases()
    for impl in case.impls
    for mode in (("fwd", "fwd+bwd") if case.backward else ("fwd",))
]


@pytest.mark.parametrize("case,impl,mode", _PARAMS)
def test_bench(benchmark, case, impl, mode):
    torch.set_num_threads(2)
    smoke = benchmark.disabled
    if smoke and case.smoke_inputs is None:
        pytest.fail(f"bench case {case.name} declares no smoke_inputs (tiny make_inputs for make test)")
    args, kwargs = (case.smoke_inputs if smoke else case.make_inputs)(_DEVICE)
    fn = case.impls[impl]
    leaves = _leaves(args, kwargs)
    benchmark(lambda: _call(fn, args, kwargs, mode, leaves))
    if mode == "fwd+bwd":
        assert all(leaf.grad is not None for leaf in leaves), "fwd+bwd produced no gradient"


def test_every_case_declares_smoke_inputs():
    missing = [c.name for c in all_cases() if c.smoke_inputs is None]
    assert not missing, f"bench cases without smoke_inputs: {missing}"


def _smoke_results() -> list[harness.Measurement]:
    results = []
    cases = all_cases()
    for case in [next(c for c in cases if c.backward), next(c for c in cases if not c.backward)]:
        for proc in (0, 1):
            results += harness.run_case(case, _DEVICE, use_compile=False, process=proc, budget_s=0.0,
                                        warmup_s=0.0, smoke=True, log=lambda _: None)
    return results


def test_harness_summary_and_table_on_smoke_cases():
    results = _smoke_results()
    assert results and all(m.regime == harness.HEADLINE and m.threads == torch.get_num_threads() for m in results)
    assert all(m.reps >= 3 and m.p20_ms <= m.median_ms <= m.p80_ms for m in results)  # 3: slower than budget
    rows = harness.ratios(results)
    # One ratio per non-primary implementation, mode and process, each within its process.
    assert rows and {r["process"] for r in rows} == {0, 1}
    summaries = harness.summarize(results)
    for s in summaries:
        assert len(s.process_medians) == 2
        assert s.p20_ms <= s.median_ms <= s.p80_ms
        assert (s.impl == "prefcore") == (s.speedups == [])
    table = harness.markdown_table(results)
    assert table.count("\n") == len(summaries) + 1 and "(2 proc.)" in table


def test_peak_memory_counts_a_temporary():
    # A 4 MiB temporary freed before the call returns is the call's peak extra memory.
    def run():
        x = torch.empty(2**20)  # 4 MiB float32
        x.fill_(1.0)
        del x
    peak = harness._peak_extra_mb(run, _DEVICE)
    assert peak is not None and 3.9 < peak < 4.5


def test_bench_table_renders_results_json(tmp_path):
    results = _smoke_results()
    info = harness.machine_info(_DEVICE)
    path = tmp_path / "cpu-test.json"
    path.write_text(json.dumps({"machine": info, "date": "2026-01-01", "regime": "ordinary", "headline": True,
                                "threads": [2], "processes": 2, "results": [m.__dict__ for m in results]}))
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_table", os.path.join(_ROOT, "tools", "bench_table.py"))
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    out = bench_table.render(str(path))
    assert "| op |" in out and results[0].op in out and "cpu-test.json" in out
    assert out.count("(2 proc.)") == len(harness.summarize(results))


def test_readme_benchmark_table_is_generated_from_the_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_table", os.path.join(_ROOT, "tools", "bench_table.py"))
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    assert bench_table.main(["--readme", "--check"]) == 0, "run: python tools/bench_table.py --readme"


def test_cli_smoke_run_in_child_processes(tmp_path):
    # The real entry point: two ordinary child processes, one op, tiny inputs.
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--no-compile", "--op", "exp_utility",
                           "--threads", "1", "--processes", "2", "--budget", "0.01", "--out", str(out)],
                          cwd=_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["headline"] is False and data["threads"] == [1]
    assert {m["process"] for m in data["results"]} == {0, 1}
    assert all(m["threads"] == 1 and m["regime"] == "ordinary" for m in data["results"])
    assert data["machine"]["torch"] == torch.__version__ and data["datetime_utc"]
