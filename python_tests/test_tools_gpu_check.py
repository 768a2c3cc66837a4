"""tools/gpu_check.py (``make gpu-check``) without a GPU: the refusal, and the results JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import importlib.util

import pytest
import torch

from helpers import ROOT

TOOL = os.path.join(ROOT, "tools", "gpu_check.py")
STAGES = ["versions", "build", "cuda-fixes", "parity", "bench", "policy"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_gpu_prints_plan_and_exits_2():
    proc = _run()
    assert proc.returncode == 2
    for i, name in enumerate(STAGES, 1):
        assert f"{i}. {name}" in proc.stdout
    assert "MAX_JOBS=16 PREFCORE_CUDA=1" in proc.stdout and "pip install --no-build-isolation --no-deps -e ." in proc.stdout
    assert "pytest -q -p no:cacheprovider -m cuda" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error: no CUDA device visible to torch")
    assert "--dry-run" in lines[0]


def test_dry_run_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = _run("--dry-run", "--stages", "versions,parity", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["dry_run"] is True and rec["status"] == "ok"
    assert [s["name"] for s in rec["stages"]] == ["versions", "parity"]
    assert rec["stages"][0]["status"] == "ok" and rec["stages"][0]["seconds"] > 0
    assert rec["stages"][1]["status"] == "skipped"  # no CPU stand-in for the parity tests
    assert rec["versions"]["torch"] == torch.__version__
    log = os.path.join(ROOT, rec["stages"][0]["log"])
    assert os.path.exists(log) and "VERSIONS " in open(log).read()


def test_unknown_stage_is_refused(tmp_path):
    proc = _run("--dry-run", "--stages", "versions,nope", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "--stages: unknown stage(s) ['nope']" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_first_failure_stops_and_leaves_json(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    py = sys.executable
    fake = [gc.Stage("versions", "ok stage", [py, "-c", "print(1)"], [py, "-c", "print('fine')"], 30),
            gc.Stage("build", "failing stage", [py], [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
            gc.Stage("bench", "never reached", [py], [py, "-c", "print(2)"], 30)]
    monkeypatch.setattr(gc, "stages", lambda *a: fake)
    out = tmp_path / "r.json"
    assert gc.main(["--dry-run", "--out", str(out)]) == 1
    rec = json.loads(out.read_text())
    assert rec["status"] == "build failed"
    assert [(s["name"], s["status"]) for s in rec["stages"]] == [("versions", "ok"), ("build", "failed")]
    assert rec["stages"][1]["returncode"] == 3 and "boom" in rec["stages"][1]["tail"]
    err = capsys.readouterr().err
    assert "boom" in err and "gpu-check: error: stage build failed (exit code 3)" in err
