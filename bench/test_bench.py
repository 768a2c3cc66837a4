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
    # The limits were measured in each child, at its thread count; every row records its warm-up.
    assert [(lim["threads"], lim["process"]) for lim in data["limits"]] == [(1, 0), (1, 1)]
    assert all(lim["copy_gbps"] > 0 and lim["gemm_bf16_gflops"] > 0 for lim in data["limits"])
    assert all(m["warmup_calls"] >= 2 for m in data["results"])


# ---- issue 19: warm-up, the machine's limits, % of limit --------------------------------------

def test_warm_up_runs_until_page_faults_stop_falling():
    # Calls 1–4 touch fresh pages, fewer each time (4, 3, 2, 1 MiB kept alive); from call 5 none.
    # The faults fall for 5 calls; call 6 is the first that is no new minimum.
    kept: list[torch.Tensor] = []

    def fn(x):
        n = 4 - len(kept)
        if n > 0:
            kept.append(torch.ones(n * 2**18))  # n MiB of float32, first touched here
        return x + 1

    tm = harness.measure(fn, (torch.zeros(4),), {}, "fwd", _DEVICE, warmup_s=0.0, budget_s=10.0, min_reps=3,
                         max_reps=3, peak=False)
    assert tm.warmup_calls == 6 and len(kept) == 4
    assert tm.minflt_per_call < 64 and len(tm.times_ms) == 3


def test_limits_are_measured_and_positive():
    lim = harness.measure_limits(_DEVICE, smoke=True)
    for key in ("gemm_fp32_gflops", "gemm_bf16_gflops", "copy_gbps"):
        assert lim[key] > 0 and lim[key] == lim[key], key
    assert lim["gemm_fp32_size"] == lim["gemm_bf16_size"] == 64


def test_case_work_counts_compulsory_bytes_and_gemm_flops():
    x = torch.zeros(10, 3, requires_grad=True)  # 120 B
    y = torch.zeros(10, 3)                      # 120 B; output (10, 3) float32: 120 B
    case = harness.BenchCase("toy", "c", lambda d: ((x, y), {}), {"prefcore": lambda a, b: a * b},
                             bound=harness.COPY)
    assert harness.case_work(case, (x, y), {}, "fwd") == {"bound": "copy", "work": 360.0}
    assert harness.case_work(case, (x, y), {}, "fwd+bwd") == {"bound": "copy", "work": 480.0}  # + x's grad
    tl = next(c for c in all_cases() if c.op == "token_logprobs" and "bf16" in c.config)
    args, kwargs = tl.smoke_inputs(_DEVICE)  # N=8, H=16, V=64
    assert harness.case_work(tl, args, kwargs, "fwd") == {"bound": "gemm_bf16", "work": 2.0 * 8 * 16 * 64}
    assert harness.case_work(tl, args, kwargs, "fwd+bwd")["work"] == 6.0 * 8 * 16 * 64


def test_percent_of_limit_uses_the_same_process_limits():
    def m(process: int, ms: float) -> harness.Measurement:
        return harness.Measurement("toy", "c", "fwd", "prefcore", ms, ms, ms, 5, None, threads=2, process=process,
                                   bound="copy", work=1e9)
    results = [m(0, 100.0), m(1, 200.0)]  # 10 GB/s and 5 GB/s of compulsory traffic
    limits = [{"threads": 2, "process": 0, "copy_gbps": 20.0}, {"threads": 2, "process": 1, "copy_gbps": 20.0}]
    (s,) = harness.summarize(results, limits=limits)
    assert s.limit_fractions == pytest.approx([0.5, 0.25])
    assert "| 25–50% copy |" in harness.markdown_table(results, limits=limits)
    assert harness.markdown_table(results).endswith("| — |")  # an older file: no limits recorded
