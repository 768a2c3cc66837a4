"""The CLI's user-error contract (issue 14): every user error of ``prefcore train-rm`` is one line
on stderr naming the file / flag / line and the problem, exit code 2, no traceback, and no output
left behind; ``--no_progress`` silences every bar and load report. Also the reusable pieces
(:func:`prefcore.cli.run_command`, :func:`prefcore.cli.claim_output`) other commands go through.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefcore import cli
from python_tests.helpers import ROOT
from python_tests.tiny_transformers import make_llama, make_tokenizer

ROW = {"prompt": "the cat", "response": "sat on the mat", "scores": [0.1, 0.5, -0.2]}


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run(monkeypatch, capfd):
    """``prefcore ARGS`` in this process (``cli.main``), from a working directory, with stdout and
    stderr captured at the file-descriptor level (the libraries' bars and logs included)."""
    def _run(args: list[str], cwd: Path) -> Result:
        monkeypatch.chdir(cwd)
        capfd.readouterr()
        try:
            code = cli.main(args)
        except SystemExit as exc:  # --help and friends
            code = exc.code
        out, err = capfd.readouterr()
        return Result(code, out, err)
    return _run


def _subprocess(args: list[str], cwd: Path) -> Result:
    """``prefcore ARGS`` in a fresh process, exactly as a user runs it."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "prefcore.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _assert_one_line_error(proc: Result, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("prefcore train-rm: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert proc.stdout == "", proc.stdout
    return line


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny local backbone (and a copy whose config.json has a wrongly typed field) and data files."""
    d = tmp_path_factory.mktemp("cli")
    make_llama(d / "bb")
    make_tokenizer(d / "bb")
    bad = d / "bb_bad"
    bad.mkdir()
    for f in (d / "bb").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (bad / "config.json").write_text(json.dumps(cfg))
    good = "".join(json.dumps(ROW) + "\n" for _ in range(10))
    (d / "good.jsonl").write_text(good)
    (d / "cut.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW)[:47] + "\n")
    (d / "array.jsonl").write_text(json.dumps(ROW) + "\n[1, 2, 3]\n")
    (d / "one.jsonl").write_text(json.dumps(ROW) + "\n")
    (d / "bad.yaml").write_text("method: gmm\n  steps: [3\n")
    (d / "bad.json").write_text('{"method": "gmm", "steps": }')
    (d / "afile").write_text("not a directory")
    return d


# --no_progress, so stderr holds nothing but the error (the default run's bars are progress, not errors)
COMMON = ["train-rm", "--method", "gmm", "--backbone", "bb", "--steps", "3", "--max_length", "16", "--no_progress"]
LOUD = [a for a in COMMON if a != "--no_progress"]


def test_jsonl_line_cut_mid_object(workdir, run):
    proc = run([*COMMON, "--data", "cut.jsonl", "--out", "o-cut"], workdir)
    _assert_one_line_error(proc, "cut.jsonl", "line 2", "mid-object")
    assert not (workdir / "o-cut").exists()


def test_row_that_is_a_json_array(workdir, run):
    proc = run([*COMMON, "--data", "array.jsonl", "--out", "o-array"], workdir)
    _assert_one_line_error(proc, "array.jsonl", "line 2", "JSON array")
    assert not (workdir / "o-array").exists()


def test_out_naming_an_existing_file(workdir, run):
    proc = run([*COMMON, "--data", "good.jsonl", "--out", "afile"], workdir)
    _assert_one_line_error(proc, "out", "'afile'", "existing file")
    assert (workdir / "afile").read_text() == "not a directory"


def test_without_no_progress_the_error_is_still_one_line_and_last_in_a_fresh_process(workdir):
    proc = _subprocess([*LOUD, "--data", "array.jsonl", "--out", "o-array2"], workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0] == proc.stderr.splitlines()[-1], proc.stderr
    assert errors[0].startswith("prefcore train-rm: error: ") and "array.jsonl, line 2" in errors[0]
    assert not (workdir / "o-array2").exists()


def test_malformed_yaml_config(workdir, run):
    proc = run(["train-rm", "bad.yaml"], workdir)
    _assert_one_line_error(proc, "bad.yaml", "line 2", "invalid YAML")


def test_malformed_json_config(workdir, run):
    proc = run(["train-rm", "bad.json"], workdir)
    _assert_one_line_error(proc, "bad.json", "line 1", "column 28", "invalid JSON")


def test_backbone_config_with_a_wrongly_typed_field(workdir, run):
    proc = run([*COMMON, "--data", "good.jsonl", "--backbone", "bb_bad", "--out", "o-bb"], workdir)
    _assert_one_line_error(proc, "bb_bad", "config.json", "num_hidden_layers")
    assert not (workdir / "o-bb").exists()


def test_one_row_data_set_leaves_no_output_and_embeds_nothing(workdir, run):
    proc = run([*COMMON, "--data", "one.jsonl", "--out", "o-one"], workdir)
    _assert_one_line_error(proc, "one.jsonl", "1 ratings rows", "eval_fraction")
    assert not (workdir / "o-one").exists()  # no OUT, so no OUT/features either


def test_bad_flag_value_is_one_line(workdir, run):
    proc = run([*COMMON, "--data", "good.jsonl", "--steps", "x"], workdir)
    _assert_one_line_error(proc, "--steps", "'x'")


def test_no_progress_is_silent_and_the_run_succeeds(workdir, run):
    proc = run([*COMMON, "--data", "good.jsonl", "--out", "o-quiet", "--no_progress"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no "Generating train split", no "Loading weights", no load report
    assert proc.stdout.startswith("prefcore train-rm [gmm] → o-quiet")
    assert (workdir / "o-quiet" / "report.json").is_file()
    # with progress the same run does show the libraries' bars (so the check above can fail)
    loud = run([*LOUD, "--data", "good.jsonl", "--out", "o-loud"], workdir)
    assert loud.returncode == 0 and "Generating train split" in loud.stderr


# ---- the reusable wrapper ------------------------------------------------------------------

def test_run_command_maps_user_errors_to_one_line_and_removes_claimed_outputs(tmp_path, capsys):
    new_dir, existing = tmp_path / "new-run", tmp_path / "kept"
    existing.mkdir()

    def body():
        cli.claim_output(new_dir)
        cli.claim_output(existing)
        new_dir.mkdir()
        (new_dir / "partial.json").write_text("{}")
        raise FileNotFoundError("data must be an existing file,\n   got 'x.jsonl'")

    assert cli.run_command("demo", body) == 2
    err = capsys.readouterr().err
    assert err == "prefcore demo: error: data must be an existing file,; got 'x.jsonl'\n"
    assert not new_dir.exists() and existing.is_dir()

    for exc in (cli.UserError("lr must be > 0"), ValueError("kl_coef must be finite"), FileExistsError("f")):
        def raising(exc=exc):
            raise exc
        assert cli.run_command("train-policy", raising) == 2
    assert cli.run_command("demo", lambda: None) == 0
    assert cli.run_command("demo", lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run_command("demo", lambda: 1 / 0)
    cli.claim_output(tmp_path / "outside")  # outside run_command: a no-op
