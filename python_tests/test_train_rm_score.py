"""``prefcore score-rm``: per-row mean, quantiles and utilities equal to RunScorer's, input order
kept under length batching, a resumed run (truncated output) ends byte-identical to the
uninterrupted one, and a 2-process torchrun run writes exactly the 1-process file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefcore.cli import main
from prefcore.utility import parse_utility
from python_tests.rm_runs import shared_runs

ROOT = Path(__file__).resolve().parents[1]
UTILS = "mean,ce:2,cvar:0.1"


def _one_thread_main(argv: list[str]) -> int:
    """``main(argv)`` with one torch thread, as each torchrun worker below (OMP_NUM_THREADS=1): CPU
    kernels may split reductions by thread count, and the byte comparisons need the same split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A qrm text run, a JSONL of 40 (prompt, response) rows, and its 1-process scores."""
    root = tmp_path_factory.mktemp("score")
    world, run, _ = shared_runs()
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"], "extra": 1}) + "\n"
                            for r in world.records))
    out = root / "scores.jsonl"
    args = ["score-rm", "--reward_model", str(run), "--data", str(data), "--utility", UTILS,
            "--batch_tokens", "96", "--progress", "false"]
    assert _one_thread_main([*args, "--out", str(out)]) == 0
    return world, run, data, out, args


def test_rows_equal_the_run_scorers_distribution_in_input_order(scored):
    from prefcore.train.rm.scoring import RunScorer

    world, run, _, out, _ = scored
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(world.records)))
    dist = RunScorer.load(str(run)).reward_distribution([r["prompt"] for r in world.records],
                                                         [r["response"] for r in world.records])
    q = torch.tensor([list(r["quantiles"].values()) for r in rows], dtype=torch.float64)
    assert list(rows[0]["quantiles"]) == [f"{0.05 * i:g}" for i in range(1, 20)]
    torch.testing.assert_close(q, dist.values.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["mean"] for r in rows], dtype=torch.float64), dist.mean().double(),
                               rtol=1e-5, atol=1e-5)
    for spec in UTILS.split(","):
        got = torch.tensor([r["utilities"][spec] for r in rows], dtype=torch.float64)
        torch.testing.assert_close(got, parse_utility(spec)(dist).double(), rtol=1e-5, atol=1e-5)


def test_a_truncated_output_resumes_to_the_same_file(scored, tmp_path, capsys):
    _, _, _, out, args = scored
    full = out.read_bytes()
    resumed = tmp_path / "scores.jsonl"
    lines = full.decode().splitlines(keepends=True)
    resumed.write_text("".join(lines[:5]) + lines[5][:17])  # five rows and a torn sixth
    assert _one_thread_main([*args, "--out", str(resumed)]) == 0
    assert "resuming, 5 of 40 rows" in capsys.readouterr().out
    assert resumed.read_bytes() == full
    assert not list(tmp_path.glob("*.partial"))


def test_changed_data_or_bad_rows_are_refused(scored, tmp_path, capsys):
    _, run, data, out, args = scored
    changed = tmp_path / "rows.jsonl"
    rows = data.read_text().splitlines()
    changed.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")
    stale = tmp_path / "stale.jsonl"
    stale.write_bytes(out.read_bytes())
    base = ["score-rm", "--reward_model", str(run), "--progress", "false"]
    assert main([*base, "--data", str(changed), "--out", str(stale)]) == 2
    assert "holds row 0 for a different text" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows[0] + "\n" + json.dumps({"prompt": "a"}) + "\n")
    assert main([*base, "--data", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "line 2: expected an object with string fields" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--out", str(tmp_path / "y.jsonl"), "--utility", "cvar:2"]) == 2
    assert "α of cvar" in capsys.readouterr().err


def test_two_torchrun_processes_write_the_one_process_file(scored, tmp_path):
    _, _, _, out, args = scored
    two = tmp_path / "scores.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "prefcore.cli", *args, "--out", str(two)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    assert two.read_bytes() == out.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_a_bt_run_scores_its_scalar_reward_and_refuses_risk_utilities(scored, tmp_path, capsys):
    from prefcore.train.rm.scoring import RunScorer

    world, _, data, _, _ = scored
    _, _, bt = shared_runs()
    out = tmp_path / "bt.jsonl"
    base = ["score-rm", "--reward_model", str(bt), "--data", str(data), "--progress", "false"]
    assert main([*base, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(rows[0]) == {"index", "text_sha256", "mean", "utilities"}
    reward = RunScorer.load(str(bt)).reward([r["prompt"] for r in world.records], [r["response"] for r in world.records])
    torch.testing.assert_close(torch.tensor([r["mean"] for r in rows], dtype=torch.float64), reward.double(),
                               rtol=1e-5, atol=1e-5)
    assert main([*base, "--out", str(tmp_path / "ce.jsonl"), "--utility", "mean,ce:2"]) == 2
    assert "only 'mean' applies" in capsys.readouterr().err and not (tmp_path / "ce.jsonl").exists()
