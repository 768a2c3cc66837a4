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
