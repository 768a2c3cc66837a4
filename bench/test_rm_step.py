"""``python -m bench.rm_step --quick`` end to end: both implementations train in their own
processes, the JSON has every workload and ratio, and the README renderer reads it. Not part of
``make test`` (about a minute); run with ``pytest bench/test_rm_step.py``."""
from __future__ import annotations

import json
import subprocess
import sys


def test_quick_run_writes_complete_results(tmp_path):
    out = tmp_path / "rm.json"
    proc = subprocess.run([sys.executable, "-m", "bench.rm_step", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"prompt24", "prompt200"}
    for per in res["results"].values():
        for impl in ("prefcore", "trl"):
            r = per[impl]
            assert len(r["step_s_all"]) == 2 and all(t > 0 for t in r["step_s_all"]) and r["pairs_per_s"] > 0
    assert set(res["results"]["prompt24"]) == {"prefcore", "trl", "prefcore-qrm", "prefcore-gmm"}
    assert res["ratios"]["prompt24"]["step_qrm_over_bt"] > 0 and res["ratios"]["prompt24"]["step_gmm_over_bt"] > 0
    assert all(r["pairs_per_s_prefcore_over_trl"] > 0 for r in res["ratios"].values())
    from tools.bench_table import render_rm_step

    assert "prompt200" in render_rm_step(str(out))
