"""The self-contained reward-model directory: a finished ``train-rm`` run holds what scoring needs.

Layout of a run directory ``RUN/`` (every file written atomically)::

    RUN/
      config.json          the run's settings (method, max_length, finetune, the source backbone path …)
      heads.json           what rebuilds the trunk and heads;  heads.safetensors  their weights
      backbone/            the backbone scoring runs on: transformers ``save_pretrained`` (safetensors)
                           of the frozen or fine-tuned encoder (LoRA merged in) plus its tokenizer

A run that holds ``backbone/`` is scored from it, so the directory can be moved or shipped and the
original ``--backbone`` path may disappear; runs on the synthetic default (features, no text) have
no backbone at all.
"""
from __future__ import annotations

import os
import shutil
import uuid

from torch import nn

BACKBONE_DIR = "backbone"


def save_backbone_dir(backbone: nn.Module, tokenizer: object, run_dir: str | os.PathLike[str]) -> str:
    """Write ``backbone`` (a transformers model, safetensors) and ``tokenizer`` to ``RUN/backbone``,
    atomically: into a temporary sibling first, then swapped in with ``os.replace`` (an older
    ``backbone/`` is replaced only once the new one is complete). Returns the directory."""
    final = os.path.join(os.fspath(run_dir), BACKBONE_DIR)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        backbone.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(final):
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def stored_backbone(run_dir: str | os.PathLike[str]) -> str | None:
    """``RUN/backbone`` when the run holds a complete backbone directory (``config.json`` in it), else None."""
    path = os.path.join(os.fspath(run_dir), BACKBONE_DIR)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


REWARD_STATS = "reward_stats.json"


def write_reward_stats(run_dir: str | os.PathLike[str], rewards) -> dict:
    """Store the mean and standard deviation of the trained model's scalar rewards (its mean reward,
    on the training texts) in ``RUN/reward_stats.json``, as OpenRLHF does, so an RL trainer can
    normalise rewards: ``{"mean", "std", "count"}`` (population std, float64 sums)."""
    import torch

    from prefcore._io import atomic_write_json

    r = torch.as_tensor(rewards).detach().double().flatten()
    if r.numel() == 0 or not bool(torch.isfinite(r).all()):
        raise ValueError(f"rewards for reward_stats must be a non-empty finite set, got {r.numel()} values")
    stats = {"mean": float(r.mean()), "std": float(r.std(unbiased=False)), "count": int(r.numel())}
    atomic_write_json(os.path.join(os.fspath(run_dir), REWARD_STATS), stats)
    return stats
