"""A small, resumable training loop shared by every reward-model method.

A run is a sequence of named *stages* (QRM has two: quantile heads, then the gating network).
Each stage trains some parameters of one ``nn.Module`` for a fixed number of steps with Adam and
a cosine schedule (linear warm-up). Everything that decides a step is a pure function of
``(seed, stage, step)`` — the mini-batch is a slice of a per-epoch permutation drawn from a
generator seeded with ``(seed, stage index, epoch)`` — so a run resumed from a checkpoint takes
exactly the steps the uninterrupted run would have taken and ends with bit-identical weights
(on the same machine, thread count and torch build).

Checkpoints (``checkpoint.pt`` in the run directory, written atomically) hold the whole
module's state, the optimizer and scheduler state of the current stage, the stage name and step
and the stages already finished. The metrics log (``metrics.jsonl``) is cut back to the
checkpoint on resume, so it too ends identical to the uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prefcore._io import atomic_torch_save

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one stage."""

    steps: int = 500
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"weight_decay and warmup_steps must be >= 0, got {self.weight_decay}, {self.warmup_steps}")


def batch_indices(n_items: int, batch_size: int, step: int, seed: int, stage_index: int) -> torch.Tensor:
    """Row indices of mini-batch ``step``: epoch ``e = step // ceil(n/bs)`` uses the permutation
    ``randperm(n)`` of a generator seeded with ``(seed, stage_index, e)``; the last batch of an
    epoch may be short. Stateless, so resuming needs only the step."""
    if n_items < 1:
        raise ValueError(f"cannot train on an empty data set (n_items = {n_items})")
    bs = min(batch_size, n_items)
    per_epoch = -(-n_items // bs)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed((seed * 1_000_003 + stage_index * 10_007 + epoch) % (2**63))
    perm = torch.randperm(n_items, generator=g)
    return perm[i * bs:(i + 1) * bs]


class MetricsLog:
    """Append-only JSONL metrics (one object per line, stable keys), flushed per line."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, keep: Callable[[dict], bool]) -> None:
        """Keep only the records for which ``keep(record)`` holds (used on resume)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and keep(json.loads(line))]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _schedule(cfg: LoopConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def load_checkpoint(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def run_stage(
    stage: str,
    stage_index: int,
    module: nn.Module,
    params: Iterable[nn.Parameter],
    batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    n_items: int,
    cfg: LoopConfig,
    run_dir: str,
    *,
    done_stages: list[str],
    resume_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> None:
    """Train ``params`` (a subset of ``module``'s) for ``cfg.steps`` steps of ``batch_loss``.

    ``batch_loss(idx) -> (loss, metrics)`` computes the scalar loss of the rows ``idx`` (a LongTensor).
    ``resume_state`` is the checkpoint dict when resuming *this* stage (module weights already loaded
    by the caller); its optimizer/scheduler state and step are restored. ``done_stages`` lists the
    stages already finished (stored in every checkpoint). Checkpoints go to ``run_dir/checkpoint.pt``
    every ``cfg.checkpoint_every`` steps and at the end of the stage.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"stage {stage!r} has no trainable parameters")
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    start = 0
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        start = int(resume_state["step"])
    os.makedirs(run_dir, exist_ok=True)
    log = MetricsLog(os.path.join(run_dir, METRICS))

    def save(step: int, finished: bool) -> None:
        atomic_torch_save(os.path.join(run_dir, CHECKPOINT), {
            "stage": stage, "step": step, "finished": finished,
            "done_stages": done_stages + ([stage] if finished else []),
            "module": module.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "loop_config": asdict(cfg),
        })

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=stage, leave=False, dynamic_ncols=True)
    module.train()
    for step in range(start, cfg.steps):
        idx = batch_indices(n_items, cfg.batch_size, step, cfg.seed, stage_index)
        loss, metrics = batch_loss(idx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage {stage!r}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write({"stage": stage, "step": step + 1, "loss": float(loss.detach()),
                       "lr": sched.get_last_lr()[0], **{k: float(v) for k, v in metrics.items()}})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save(step + 1, finished=False)
    if bar is not None:
        bar.close()
    module.eval()
    save(cfg.steps, finished=True)
