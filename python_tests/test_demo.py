"""``prefcore demo --quick`` end to end over two seeds: the report's mean ± sd cells equal the
statistics of the per-seed metrics files (computed here with ``statistics``), the per-seed and
reward-model tables hold exactly the files' numbers, the plots exist, the findings follow the
seed counts (and flip wording when seeds disagree, on constructed metrics), adding a seed runs only
that seed's stages, and an interrupted run resumes to the same report."""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from prefcore.demo import report

PLOTS = ("rating_distributions.png", "left_tail_quantiles.png", "risk_tradeoff.png", "training_curves.png")
POLICIES = ["start", "rloo-mean", "rloo-ce4", "rloo-mean-var1", "rloo-cvar0.25"]
RISK_AWARE = ("rloo-ce4", "rloo-mean-var1", "rloo-cvar0.25")
SEEDS = (0, 1)

pytestmark = pytest.mark.slow


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefcore.cli", "demo", "--out", str(out), "--quick",
                           "--no_progress", *extra], capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Seed 0 alone, then seeds 0,1 in the same directory (the second run adds seed 1)."""
    out = tmp_path_factory.mktemp("demo")
    first = _run(out, "--seeds", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(out, "--seeds", "0,1")
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first, second


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with ``| header |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _seed_metrics(out: Path) -> dict[int, dict]:
    return {s: json.loads((out / f"seed-{s}" / "eval" / "metrics.json").read_text()) for s in SEEDS}


def test_adding_a_seed_runs_only_that_seed(demo_run):
    _, first, second = demo_run
    assert re.search(r"stages run: world, feedback, rm-bt, rm-qrm, rm-gmm, eval, seed-0/rloo-mean, "
                     r"seed-0/rloo-ce4, seed-0/rloo-mean-var1, seed-0/rloo-cvar0\.25, seed-0/eval;", first.stdout)
    ran = re.search(r"stages run: ([^;]*);", second.stdout).group(1).split(", ")
    assert ran == [f"seed-1/{p}" for p in POLICIES[1:]] + ["seed-1/eval"], second.stdout[-800:]


def test_report_mean_sd_equals_per_seed_files(demo_run):
    out, _, second = demo_run
    text = (out / "report.md").read_text()
    per_seed = _seed_metrics(out)
    rows = _table(text, "policy")
    assert [r[0] for r in rows] == POLICIES
    for r in rows:
        expect = []
        for key, _ in report.POLICY_COLUMNS:
            vals = [per_seed[s]["policies"][r[0]][key] for s in SEEDS]
            expect.append(f"{report.fmt(statistics.mean(vals))} ± {report.fmt(statistics.stdev(vals))}")
        assert r[1:] == expect, r[0]
    assert "| policy |" in second.stdout and rows[1][0] in second.stdout  # the summary table is printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == list(SEEDS)
    crr = [per_seed[s]["policies"]["rloo-mean"]["crr"] for s in SEEDS]
    assert summary["policies"]["rloo-mean"]["crr"]["values"] == crr


def test_per_seed_and_reward_model_tables_equal_files(demo_run):
    out, _, _ = demo_run
    text = (out / "report.md").read_text()
    per_seed = _seed_metrics(out)
    for s in SEEDS:
        rows = _table(text, f"seed {s}")
        assert [r[0] for r in rows] == per_seed[s]["policy_order"] == POLICIES
        for r in rows:
            assert r[1:] == [report.fmt(per_seed[s]["policies"][r[0]][k]) for k, _ in report.POLICY_COLUMNS]
    shared = json.loads((out / "eval" / "metrics.json").read_text())
    rm_rows = _table(text, "reward model")
    assert [r[0] for r in rm_rows] == ["rm-bt", "rm-qrm", "rm-gmm"]
    for r in rm_rows:
        assert r[1:] == [report.fmt(shared["reward_models"][r[0]].get(k)) for k, _ in report.RM_COLUMNS]


def test_metrics_are_sane(demo_run):
    out, _, _ = demo_run
    for s, metrics in _seed_metrics(out).items():
        start = metrics["policies"]["start"]
        assert start["pmr"] == 0.5 and abs(start["kl_to_start"]) < 1e-9  # identical samples by construction
        for name, p in metrics["policies"].items():
            assert -1.0 <= p["mean_rating"] <= 1.0 and 0.0 <= p["crr"] <= 1.0 and 0.0 <= p["pmr"] <= 1.0, name
            assert -1.0 <= p["q05"] <= p["q10"] <= p["q25"] <= 1.0, name
    # different seeds train different policies
    m0, m1 = (_seed_metrics(out)[s]["policies"]["rloo-mean"] for s in SEEDS)
    assert m0 != m1


def test_plots_and_training_logs_exist(demo_run):
    out, _, _ = demo_run
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
        assert f"]({name})" in (out / "report.md").read_text()
    for s in SEEDS:
        for stage in POLICIES[1:]:
            lines = (out / f"seed-{s}" / stage / "metrics.jsonl").read_text().splitlines()
            assert len(lines) >= 1 and "reward" in json.loads(lines[-1])
    for stage in ("rm-bt", "rm-qrm", "rm-gmm"):
        assert (out / stage / "metrics.jsonl").exists()


def test_report_findings_follow_seed_counts(demo_run):
    out, _, _ = demo_run
    text = (out / "report.md").read_text()
    assert "prefcore train-rm --method qrm" in text and "prefcore train-policy --algo rloo" in text
    per_seed = _seed_metrics(out)
    for name in RISK_AWARE:
        line = next(line for line in text.splitlines() if line.startswith(f"- `{name}`"))
        fell = sum(per_seed[s]["policies"][name]["crr"] < per_seed[s]["policies"]["rloo-mean"]["crr"] for s in SEEDS)
        phrase = {2: "CRR fell in 2 of 2 seeds", 1: "the seeds disagree: CRR fell in only 1 of 2 seeds",
                  0: "CRR did **not** fall in any of the 2 seeds"}[fell]
        assert phrase in line, line


def _seed(crr_mean: float, crr_ce: float, rating_mean: float, rating_ce: float) -> dict:
    pol = {"rloo-mean": {"crr": crr_mean, "mean_rating": rating_mean},
           "rloo-ce4": {"crr": crr_ce, "mean_rating": rating_ce}}
    return {"policies": pol, "policy_order": list(pol)}


def test_finding_wording_flips_when_seeds_disagree():
    # constructed seed-level metrics, no training: the numbers in the sentence are computed here
    agree = {0: _seed(0.50, 0.10, 0.10, 0.15), 1: _seed(0.40, 0.02, 0.12, 0.13), 2: _seed(0.45, 0.05, 0.11, 0.10)}
    (line,) = report.findings(agree)
    drops = [0.40, 0.38, 0.40]
    changes = [0.05, 0.01, -0.01]
    assert (f"CRR fell in 3 of 3 seeds, by {report.fmt(statistics.mean(drops))} ± "
            f"{report.fmt(statistics.stdev(drops))}") in line, line
    assert (f"the true mean rating fell in 1 of 3 seeds (change +{report.fmt(statistics.mean(changes))} ± "
            f"{report.fmt(statistics.stdev(changes))})") in line, line
    assert "disagree" not in line

    disagree = {0: _seed(0.50, 0.10, 0.10, 0.15), 1: _seed(0.40, 0.60, 0.12, 0.13), 2: _seed(0.45, 0.50, 0.11, 0.10)}
    (line,) = report.findings(disagree)
    assert "the seeds disagree: CRR fell in only 1 of 3 seeds" in line and "fell in 3 of 3" not in line, line

    none = {0: _seed(0.10, 0.20, 0.10, -0.10), 1: _seed(0.10, 0.30, 0.12, -0.05)}
    (line,) = report.findings(none)
    assert "CRR did **not** fall in any of the 2 seeds" in line, line
    # the rating fell by more than 0.1 in every seed: only then is the cost called large
    assert "the true mean rating fell in 2 of 2 seeds (a large cost: change -0.185 ± 0.021)" in line, line


def test_seeds_flag():
    from prefcore.cli import main, parse_demo

    assert parse_demo([]).seed_list == (0, 1, 2)
    assert parse_demo(["--quick"]).seed_list == (0,)
    assert parse_demo(["--seeds", "3,1", "--quick"]).seed_list == (3, 1)
    assert parse_demo(["--seed", "4"]).seed_list == (4,)  # the old flag still reads as --seeds
    for bad in ("0,a", "1,1", "-1", ""):
        with pytest.raises(ValueError, match="seeds"):
            parse_demo(["--seeds", bad])
    assert main(["demo", "--seeds", "0,x", "--out", "unused-never-created"]) == 2
    assert not Path("unused-never-created").exists()


def test_resume_recomputes_only_missing_stages(demo_run, tmp_path):
    out, _, _ = demo_run
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    # simulate an interruption during seed 1's last RLOO run: its marker and everything after are gone
    for stage in ("seed-1/rloo-cvar0.25", "seed-1/eval"):
        (copy / "stages" / f"{stage}.json").unlink()
    shutil.rmtree(copy / "seed-1" / "eval")
    (copy / "report.md").unlink()
    proc = _run(copy, "--seeds", "0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"stages run: seed-1/rloo-cvar0\.25, seed-1/eval;", proc.stdout), proc.stdout[-500:]
    # the absolute paths in the report differ between the two directories; compare after mapping
    expect = (out / "report.md").read_text().replace(str(out), str(copy))
    assert (copy / "report.md").read_text() == expect
