"""``prefcore train-rm --finetune`` under torchrun (2 gloo processes): DDP and FSDP2 (``--fsdp``)
runs equal the one-process run over the same rows per step — per_device × accumulation ×
processes — including gradient accumulation, a last batch that leaves one process without rows,
LoRA, a ratings method (gmm) and an FSDP2 run that crashes and resumes from its checkpoint.
One torchrun launch runs every distributed configuration (each launch costs ~10 s here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefcore.cli import main
from python_tests.rm_runs import text_world

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]

# Each rank runs the argv lists in order inside one process group; the run whose out ends in
# "-crash" raises after its step 3 (on both ranks: the step's collectives are done), the next
# run resumes it. Exit status: the largest of the runs' exit codes.
CHILD = r"""
import json, sys
import torch.distributed as dist
import prefcore.train.rm.finetune as ft
from prefcore.cli import main

dist.init_process_group("gloo")
rows, pair_rewards = [], ft.pair_rewards
def recording(encoder, heads, pairs, idx, *args):  # the rows this rank's micro-batches read
    rows.append(list(idx))
    return pair_rewards(encoder, heads, pairs, idx, *args)
ft.pair_rewards = recording
codes = []
for argv in json.loads(sys.argv[1]):
    out = argv[argv.index("--out") + 1]
    crash = out.endswith("-crash") and "--resume" not in argv
    rows.clear()
    def after(step, crash=crash):
        if crash and step == 3:
            raise RuntimeError("simulated crash")
    ft.AFTER_STEP = after
    try:
        codes.append(main(argv))
    except RuntimeError as exc:
        codes.append(0 if "simulated crash" in str(exc) else 1)
    with open(f"{out}.rows{dist.get_rank()}.json", "w") as f:
        json.dump(rows, f)
dist.destroy_process_group()
sys.exit(max(codes))
"""

# 40 items/pairs, 9 held out: 31 training rows
COMMON = ["--max_length", "48", "--eval_fraction", "0.225", "--learning_rate", "1e-3", "--head_learning_rate",
          "1e-2", "--trunk_layers", "0", "--log_every", "1", "--checkpoint_every", "2", "--progress", "false"]


def _argv(world, out: Path, method: str, mode: str, per_device: int, accum: int, steps: int, *extra: str) -> list[str]:
    data = str(world.pairs) if method.startswith("bt") else str(world.ratings)
    return ["train-rm", "--method", method, "--finetune", mode, "--data", data, "--backbone", str(world.backbone),
            "--out", str(out), "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps",
            str(accum), "--max_steps", str(steps), *COMMON, *extra]


# name: (method, finetune, per_device, steps, extra); 2 processes × accumulation a = 1 process × 2a
CASES = {
    # 6 rows per step: the 6th step's batch holds the epoch's last row, so rank 1 has none
    "ddp-bt-full": ("bt", "full", 3, 1, 6, ()),
    "fsdp-bt-full": ("bt", "full", 2, 2, 4, ("--fsdp", "true")),
    "fsdp-gmm-lora": ("gmm", "lora", 2, 2, 3, ("--fsdp", "true")),
}


def _metrics(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_time"} for r in recs]


def _close(a: object, b: object, key: str = "") -> bool:
    if "accuracy" in key:
        # the share of pairs with r_c > r_r: a few steps into training the tiny model's rewards
        # differ by ~1e-6 (loss ≈ log 2), so rounding flips pairs; the loss, the gradient norm
        # and the weights carry the comparison
        return 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
    if isinstance(a, float) and isinstance(b, (int, float)):
        return b == pytest.approx(a, rel=1e-4, abs=1e-5)
    return a == b


def _assert_same_run(one: Path, two: Path) -> None:
    ma, mb = _metrics(one), _metrics(two)
    assert len(ma) == len(mb) > 0, (one.name, two.name)
    for a, b in zip(ma, mb):
        assert a.keys() == b.keys(), (a, b)
        for k in a:
            assert _close(a[k], b[k], k), (two.name, a["step"], k, a[k], b[k])
    for name in ("heads.safetensors", "backbone/model.safetensors"):
        wa, wb = load_file(str(one / name)), load_file(str(two / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{two.name} {name} {k}: {m}")
    ra, rb = (json.loads((r / "report.json").read_text()) for r in (one, two))
    assert ra.keys() == rb.keys()
    for k in ra:
        assert _close(ra[k], rb[k], k), (two.name, k, ra[k], rb[k])


def test_ddp_and_fsdp_two_processes_equal_one_process(tmp_path):
    world = text_world(tmp_path / "world")
    runs = []
    for name, (method, mode, per_device, accum, steps, extra) in CASES.items():
        runs.append(_argv(world, tmp_path / name, method, mode, per_device, accum, steps, *extra))
    # FSDP2 crash after step 3 (checkpoint at step 2), then --resume: ends as fsdp-bt-full
    crash = _argv(world, tmp_path / "fsdp-bt-crash", "bt", "full", 2, 2, 4, "--fsdp", "true")
    runs += [crash, crash + ["--resume", "true"]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--no-python", sys.executable, "-c", CHILD, json.dumps(runs)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DDP over 2 processes" in proc.stdout and "FSDP over 2 processes" in proc.stdout

    # the ranks split each step's rows: 5 steps of 3 + 3 rows, then the epoch's 31st row on rank 0
    # while rank 1 runs a zero-weight pass (its last call, one row already in the batch)
    r0, r1 = (json.loads((tmp_path / f"ddp-bt-full.rows{r}.json").read_text()) for r in (0, 1))
    assert len(r1) == 6  # rank 0 goes on to score the train and held-out pairs for the report
    r0 = r0[:6]
    assert [len(c) for c in r0] == [3] * 5 + [1] and [len(c) for c in r1] == [3] * 5 + [1]
    seen0, seen1 = {i for c in r0 for i in c}, {i for c in r1[:-1] for i in c}
    assert not seen0 & seen1 and len(seen0 | seen1) == 31 and r1[-1][0] in seen0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1)
    try:
        for name, (method, mode, per_device, accum, steps, _) in CASES.items():
            one = tmp_path / f"one-{name}"
            assert main(_argv(world, one, method, mode, per_device, 2 * accum, steps)) == 0
            _assert_same_run(one, tmp_path / name)
            if name == "fsdp-bt-full":
                _assert_same_run(one, tmp_path / "fsdp-bt-crash")
    finally:
        torch.set_num_threads(threads)
    # rank 0 alone wrote: no stray per-rank files, one metrics record per step
    assert sorted(p.name for p in (tmp_path / "ddp-bt-full").iterdir()) == sorted(
        p.name for p in (tmp_path / "one-ddp-bt-full").iterdir())
    assert [m["step"] for m in _metrics(tmp_path / "fsdp-bt-crash")] == [1, 2, 3, 4]
