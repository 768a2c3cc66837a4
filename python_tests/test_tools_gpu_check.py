"""tools/gpu_check.py (``make gpu-check``) without a GPU: the refusal, and the results JSON."""
from __future__ import annotations

import json
import os
import sys

import importlib.util

import pytest
import torch

from helpers import ROOT

TOOL = os.path.join(ROOT, "tools", "gpu_check.py")
STAGES = ["versions", "build", "cuda-fixes", "parity", "policy", "bench"]


def _load():
    """tools/gpu_check.py as a module (in-process: no second torch import per test)."""
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    gc = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gc  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(gc)
    return gc


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_gpu_prints_plan_and_exits_2(capsys):
    assert _load().main([]) == 2
    out, err = capsys.readouterr()
    for i, name in enumerate(STAGES, 1):
        assert f"{i}. {name}" in out
    assert "MAX_JOBS=16 PREFCORE_CUDA=1" in out and "pip install --no-build-isolation --no-deps -e ." in out
    assert "pytest -q -p no:cacheprovider -m cuda" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error: no CUDA device visible to torch")
    assert "--dry-run" in lines[0]


def test_dry_run_writes_json(tmp_path):
    out = tmp_path / "r.json"
    assert _load().main(["--dry-run", "--stages", "versions,parity", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["dry_run"] is True and rec["status"] == "ok"
    assert [s["name"] for s in rec["stages"]] == ["versions", "parity"]
    assert rec["stages"][0]["status"] == "ok" and rec["stages"][0]["seconds"] > 0
    assert rec["stages"][1]["status"] == "skipped"  # no CPU stand-in for the parity tests
    assert rec["versions"]["torch"] == torch.__version__
    log = os.path.join(ROOT, rec["stages"][0]["log"])
    assert os.path.exists(log) and "VERSIONS " in open(log).read()


def test_unknown_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _load().main(["--dry-run", "--stages", "versions,nope", "--out", str(tmp_path / "r.json")])
    assert exc.value.code == 2 and "--stages: unknown stage(s) ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_first_failure_stops_and_leaves_json(tmp_path, monkeypatch, capsys):
    gc = _load()
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
