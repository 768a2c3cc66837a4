"""``torch.distributed`` helpers shared by the policy and reward-model trainers: the process group
from torchrun's environment (gloo on CPU, nccl on CUDA), ``(rank, world)``, a summing all-reduce,
and FSDP2 sharding of a transformers trunk (``fully_shard`` per decoder layer, then the root)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The process count torchrun launched (``WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str) -> str:
    """``device`` with a bare ``"cuda"`` turned into this process's GPU (``cuda:LOCAL_RANK``)."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else device


def maybe_init(device: str) -> bool:
    """Initialise the process group from torchrun's environment (gloo on CPU; nccl on CUDA, with
    this process's GPU ``LOCAL_RANK`` made current first, so collectives and barriers use it);
    True when this call did it (and the caller should tear it down)."""
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(rank_device(device)))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


def all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of ``t`` over the ranks, on ``t``'s device (a copy; ``t`` itself when there is one
    rank). NCCL reduces only CUDA tensors: a CPU tensor (a metric) goes through the current GPU."""
    if world_size > 1:
        home = t.device
        if dist.get_backend() == "nccl" and home.type != "cuda":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            t = t.clone()
        dist.all_reduce(t)
        t = t.to(home)
    return t


def shard_decoder_layers(root: nn.Module, trunk: nn.Module) -> None:
    """FSDP2: ``fully_shard`` every block of ``trunk.layers`` (an ``nn.ModuleList``), then ``root``
    (whose group holds what is left: embeddings, final norm, …)."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("fsdp: the model's trunk has no `layers` ModuleList of decoder blocks to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)
