"""Smoke test of ``bench/pair_forward.py``: ``pytest bench/test_pair_forward.py -q``.

Runs the quick mode (2 pairs, 1-layer 16-wide Llama, one timed call per forward) in-process and
checks the results file's structure and the token counts; it measures nothing.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench import pair_forward as pf


def test_quick_run_writes_the_results_file(tmp_path, capsys):
    out = tmp_path / "pair-forward.json"
    assert pf.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] and res["config"] == {**pf.asdict(pf.QUICK)}
    for mode in pf.MODES:
        m = res["results"][mode]
        assert m["reps"] == 1 and 0 < m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]
        assert m["peak_mb"] is None or m["peak_mb"] >= 0
    # the two forwards score the pairs alike (a broken layout cannot look fast)
    assert res["max_abs_reward_diff"] < 1e-5
    assert res["results"]["packed"]["tokens"] < res["results"]["plain"]["tokens"]
    assert "| packed |" in capsys.readouterr().out


def test_token_counts():
    # prompts of 3 and 1 tokens, chosen 2 and 4, rejected 1 and 1 (masks are what counts)
    seg = lambda lens: (torch.zeros(2, 4, dtype=torch.long),  # noqa: E731
                        torch.tensor([[1] * n + [0] * (4 - n) for n in lens]))
    p, c, r = seg([3, 1]), seg([2, 4]), seg([1, 1])
    assert pf.tokens("packed", p, c, r) == 2 * max(3 + 2 + 1, 1 + 4 + 1)
    assert pf.tokens("plain", p, c, r) == 2 * 2 * max(3 + 2, 1 + 4)


def test_bad_arguments():
    with pytest.raises(SystemExit):
        pf.main(["--quick", "--dtype", "int8"])
