"""Smoke test of ``bench/policy_step.py``: ``pytest bench/test_policy_step.py -q``.

Runs the quick mode (2 prompts × 2 generations, 8 new tokens, one measured step) on the small
vocabulary in bf16 (the fp32 rows run the same code without autocast) — two child processes,
one per implementation — and checks the results file's
structure; plus the pieces the full run relies on (the 32k tokenizer, the percentile helper).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import policy_step as ps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_32k_tokenizer_extends_the_text_world_vocabulary():
    small, big = ps.build_tokenizer(None), ps.build_tokenizer(32000)
    assert len(big) == 32000 and len(small) < 200
    prompt = "tell me about the snow ?"
    assert big(prompt)["input_ids"] == small(prompt)["input_ids"]  # same ids for the shared words
    assert big.convert_tokens_to_ids("w31999") == 31999
    assert (big.pad_token_id, big.eos_token_id) == (small.pad_token_id, small.eos_token_id)
    with pytest.raises(ValueError, match="vocab_size"):
        ps.build_tokenizer(10)


def test_quantile_interpolates():
    assert ps._quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.5) == 3.0
    assert ps._quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    assert ps._quantile([7.0], 0.8) == 7.0


def test_quick_run_writes_the_results_file(tmp_path):
    out = tmp_path / "policy-step.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench.policy_step", "--quick", "--vocab", "small", "--threads", "1",
                           "--precision", "bf16", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("machine", "date", "threads", "load_avg_before", "load_avg_after", "config", "results", "ratios"):
        assert key in res, key
    for key in ("torch", "transformers", "trl", "cpu", "torch_threads"):
        assert key in res["machine"], key
    assert res["threads"] == res["machine"]["torch_threads"] == 1
    assert set(res["results"]) == {"small"} and res["precisions"] == ["bf16"]
    assert set(res["results"]["small"]) == {"prefcore bf16", "trl bf16"}
    for impl in ("prefcore bf16", "trl bf16"):
        s = res["results"]["small"][impl]
        assert s["steps_measured"] == 1
        st = s["step_s"]
        assert 0 < st["p20"] <= st["median"] <= st["p80"]
        split = sum(s["phases_s"][p]["median"] for p in ps.PHASES)
        assert split == pytest.approx(st["median"], rel=1e-6)  # the split adds up to the step
        for p in ps.PHASES:
            assert s["phases_s"][p]["median"] >= 0, (impl, p)
        assert 0 < s["phases_s"]["ref_old_logprobs"]["median"] <= s["phases_s"]["update"]["median"]
        assert s["peak_mem_mib"] >= 0
        assert 1 <= s["mean_completion_length"] <= res["config"]["max_completion_length"]
    r = res["ratios"]["small"]
    assert set(r) == {"bf16_steps_per_s_prefcore_over_trl", "bf16_peak_mem_prefcore_over_trl"}
    assert r["bf16_steps_per_s_prefcore_over_trl"] == pytest.approx(
        res["results"]["small"]["trl bf16"]["step_s"]["median"]
        / res["results"]["small"]["prefcore bf16"]["step_s"]["median"])
    assert "bf16: prefcore/TRL steps per second" in ps.markdown(res)
    assert res["targets_met"] is None  # the targets are judged at V = 32k only


def test_ratios_within_and_across_precisions():
    def row(step_s: float, mem: float) -> dict:
        return {"step_s": {"median": step_s}, "peak_mem_mib": mem}

    per = {"prefcore": row(2.0, 100.0), "trl": row(6.0, 400.0), "prefcore bf16": row(1.0, 80.0),
           "trl bf16": row(5.0, 0.0)}
    r = ps._ratios(per)
    assert r["steps_per_s_prefcore_over_trl"] == pytest.approx(3.0)
    assert r["peak_mem_prefcore_over_trl"] == pytest.approx(0.25)
    assert r["bf16_steps_per_s_prefcore_over_trl"] == pytest.approx(5.0)
    assert r["bf16_peak_mem_prefcore_over_trl"] is None  # no measurable TRL rise
    assert r["steps_per_s_prefcore_bf16_over_fp32"] == pytest.approx(2.0)
    assert ps._ratios({"prefcore": row(1.0, 1.0)}) == {}
