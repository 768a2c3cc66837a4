"""Feature extraction under torchrun (2 gloo processes): the ranks split the shards of one cache,
rank 0 writes the index, the cache is byte-identical to the one-process cache, and an extraction
interrupted by a crashed rank resumes without recomputing the shards already written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from prefcore.train.rm.features import extract_features
from python_tests.tiny_transformers import TEXTS, make_llama, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
N_TEXTS, SHARD, BATCH, MAXLEN = 24, 4, 3, 16  # 6 shards: rank 0 takes 0, 2, 4; rank 1 takes 1, 3, 5

CHILD = r"""
import json, os, sys
import torch.distributed as dist
from python_tests.test_train_rm_features_dist import N_TEXTS, SHARD, BATCH, MAXLEN, texts
from python_tests.tiny_transformers import make_llama, make_tokenizer
import prefcore.train.rm.features as F

out, crash_at = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1 and crash_at >= 0:  # rank 1 dies while writing its crash_at-th shard (0-based)
    save, calls = F.atomic_save_safetensors, [0]
    def crashing_save(*args, **kw):
        if calls[0] == crash_at:
            os._exit(3)
        calls[0] += 1
        save(*args, **kw)
    F.atomic_save_safetensors = crashing_save
idx = F.extract_features(make_llama(), make_tokenizer(), texts(), out, batch_size=BATCH, shard_size=SHARD,
                         max_length=MAXLEN)
with open(f"{out}.computed{rank}.json", "w") as f:  # beside the cache; stdout of the ranks interleaves
    json.dump(list(idx.computed), f)
dist.destroy_process_group()
"""


def texts() -> list[str]:
    return [f"{TEXTS[i % len(TEXTS)]} {TEXTS[(3 * i) % len(TEXTS)]}" for i in range(N_TEXTS)]


def _torchrun(out: Path, crash_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--no-python", sys.executable, "-c", CHILD, str(out), str(crash_at)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_ranks_build_the_one_process_cache_and_resume_after_a_crash(tmp_path):
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (OMP_NUM_THREADS=1): the byte comparison needs the same kernels
    try:
        extract_features(make_llama(), make_tokenizer(), texts(), one, batch_size=BATCH, shard_size=SHARD,
                         max_length=MAXLEN)
    finally:
        torch.set_num_threads(threads)

    two = tmp_path / "two"
    crashed = _torchrun(two, crash_at=1)  # rank 1 writes shard 1, then dies writing shard 3
    assert crashed.returncode != 0
    assert (two / "shard-00001.safetensors").is_file() and not (two / "shard-00003.safetensors").exists()
    assert not json.loads((two / "index.json").read_text())["complete"]

    resumed = _torchrun(two, crash_at=-1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    computed = {r: json.loads((tmp_path / f"two.computed{r}.json").read_text()) for r in (0, 1)}
    assert 1 not in computed[1] and {3, 5} <= set(computed[1])
    assert set(computed[0]) <= {0, 2, 4}

    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())  # no index.rank*.json left behind
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_train_rm_under_torchrun_splits_extraction_and_rank_0_trains(tmp_path):
    """``torchrun … prefcore train-rm`` (frozen features) as a user runs it: the two processes
    split the shards of the run's feature cache, rank 0 alone trains the heads and writes the run
    directory, and the result equals the one-process run's."""
    from safetensors.torch import load_file

    from prefcore.cli import main
    from python_tests.rm_runs import text_world

    world = text_world(tmp_path / "world")  # 40 rated texts: 5 shards of 8
    argv = ["train-rm", "--method", "gmm", "--data", str(world.ratings), "--backbone", str(world.backbone),
            "--max_length", "48", "--steps", "20", "--feature_shard_size", "8", "--progress", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "prefcore.cli", *argv, "--out", str(two)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("prefcore train-rm [gmm] →") == 1  # rank 0 alone reports
    cache = two / "features" / "ratings-responses"
    index = json.loads((cache / "index.json").read_text())
    assert index["complete"] and index["num_shards"] == 5 and not list(cache.glob("index.rank*.json"))

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for s in range(5):  # the ranks' shards are the one-process shards, byte for byte
        name = f"shard-{s:05d}.safetensors"
        assert (cache / name).read_bytes() == (one / "features" / "ratings-responses" / name).read_bytes()
    wa, wb = load_file(str(one / "heads.safetensors")), load_file(str(two / "heads.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((one / "report.json").read_text()) == json.loads((two / "report.json").read_text())
