"""``python -m bench.serve_rm --quick`` end to end (a real server on loopback, real clients): the
JSON has every row, every request was answered, and the README renderer reads it. Not part of
``make test`` (about half a minute); run with ``pytest bench/test_serve_rm.py``."""
from __future__ import annotations

import json
import subprocess
import sys


def test_quick_run_writes_complete_results(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "bench.serve_rm", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for mode in ("batched", "one-at-a-time"):
        rows = res["results"][mode]
        assert [r["clients"] for r in rows] == [1, 4]
        assert all(r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
        assert res["results"][mode + "/server_stats"]["samples"] >= sum(r["requests"] for r in rows)
    assert res["ratio"]["throughput_batched_over_one_at_a_time"] > 0
    from tools.bench_table import render_serve_rm

    assert "one-at-a-time" in render_serve_rm(str(out))
