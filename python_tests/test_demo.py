"""``prefcore demo --quick`` end to end: the report's tables hold exactly the numbers of the metrics
files, the plots exist, the risk findings are stated, and an interrupted run resumes to the same
report while recomputing only the missing stages."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefcore.demo import report

pytestmark = pytest.mark.slow

PLOTS = ("rating_distributions.png", "left_tail_quantiles.png", "risk_tradeoff.png", "training_curves.png")


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefcore.cli", "demo", "--out", str(out), "--quick",
                           "--no_progress", *extra], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


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


def test_report_tables_equal_metrics_files(demo_run):
    out, _ = demo_run
    text = (out / "report.md").read_text()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    rows = _table(text, "policy")
    assert [r[0] for r in rows] == metrics["policy_order"] == [
        "start", "rloo-mean", "rloo-ce4", "rloo-mean-var1", "rloo-cvar0.25"]
    for r in rows:
        vals = metrics["policies"][r[0]]
        assert r[1:] == [report.fmt(vals[k]) for k, _ in report.POLICY_COLUMNS], r[0]
    rm_rows = _table(text, "reward model")
    assert [r[0] for r in rm_rows] == ["rm-bt", "rm-qrm", "rm-gmm"]
    for r in rm_rows:
        vals = metrics["reward_models"][r[0]]
        assert r[1:] == [report.fmt(vals.get(k)) for k, _ in report.RM_COLUMNS]
    # the QRM reward model's own report.json agrees with its training stage
    qrm_report = json.loads((out / "rm-qrm" / "report.json").read_text())
    assert qrm_report  # written by train-rm


def test_metrics_are_sane(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    start = metrics["policies"]["start"]
    assert start["pmr"] == 0.5 and abs(start["kl_to_start"]) < 1e-9  # identical samples by construction
    for name, p in metrics["policies"].items():
        assert -1.0 <= p["mean_rating"] <= 1.0 and 0.0 <= p["crr"] <= 1.0 and 0.0 <= p["pmr"] <= 1.0, name
        assert -1.0 <= p["q05"] <= p["q10"] <= p["q25"] <= 1.0, name
    for name, r in metrics["reward_models"].items():
        assert 0.0 <= r["pairwise_accuracy"] <= 1.0, name


def test_plots_and_training_logs_exist(demo_run):
    out, proc = demo_run
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
        assert f"]({name})" in (out / "report.md").read_text()
    for stage in ("rloo-mean", "rloo-ce4", "rloo-mean-var1", "rloo-cvar0.25"):
        lines = (out / stage / "metrics.jsonl").read_text().splitlines()
        assert len(lines) >= 1 and "reward" in json.loads(lines[-1])
    for stage in ("rm-bt", "rm-qrm", "rm-gmm"):
        assert (out / stage / "metrics.jsonl").exists()
    assert "| policy |" in proc.stdout  # the summary table is printed at the end


def test_report_states_commands_and_findings(demo_run):
    out, _ = demo_run
    text = (out / "report.md").read_text()
    assert "prefcore train-rm --method qrm" in text and "prefcore train-policy --algo rloo" in text
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    base = metrics["policies"]["rloo-mean"]["crr"]
    for name in ("rloo-ce4", "rloo-mean-var1", "rloo-cvar0.25"):
        line = next(line for line in text.splitlines() if line.startswith(f"- `{name}`"))
        lowered = metrics["policies"][name]["crr"] < base
        assert ("did **not** lower CRR" in line) != lowered, line


def test_resume_recomputes_only_missing_stages(demo_run, tmp_path):
    out, _ = demo_run
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    # simulate an interruption during the last RLOO run: its marker and everything after are gone
    for stage in ("rloo-cvar0.25", "eval"):
        (copy / "stages" / f"{stage}.json").unlink()
    shutil.rmtree(copy / "eval")
    (copy / "report.md").unlink()
    # the absolute paths in the report differ between the two directories; compare after mapping
    proc = _run(copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"stages run: rloo-cvar0\.25, eval;", proc.stdout), proc.stdout[-500:]
    expect = (out / "report.md").read_text().replace(str(out), str(copy))
    assert (copy / "report.md").read_text() == expect
