"""Argument checks and the reduction shared by the pairwise losses.

Every failure raises ``ValueError`` (``TypeError`` for a non-tensor) naming the argument and
saying what was expected and what was received. Unlike the op wrappers, some checks here
look at values (votes must be 0/1, lengths and ``f`` must be positive): these losses take
small per-pair tensors, so one host sync per call is cheap next to the forward pass that
produced them, and a silent wrong answer would be far more expensive.
"""
from __future__ import annotations

import torch

from prefcore.ops._checks import (
    require_choice,
    require_finite_float,
    require_floating,
    require_same_device,
    require_tensor,
    shape_str,
)

REDUCTIONS = ("none", "mean", "sum")

__all__ = [
    "REDUCTIONS",
    "compute_dtype",
    "pair_tensors",
    "per_pair_term",
    "reduce_pairs",
    "require_choice",
    "require_finite_float",
    "require_floating",
    "require_same_device",
    "require_tensor",
    "shape_str",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair_tensors(first_name: str, first: object, second_name: str, second: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors floating, same shape (no broadcasting: a silent broadcast of a ``(B,)``
    against a ``(B, 1)`` would build a ``(B, B)`` loss), same device."""
    a = require_floating(first, first_name)
    b = require_floating(second, second_name)
    if a.shape != b.shape:
        raise ValueError(f"{second_name} must have the shape of {first_name} {shape_str(a.shape)}, got {shape_str(b.shape)}")
    require_same_device(first_name, a, **{second_name: b})
    return a, b


def per_pair_term(
    value: float | torch.Tensor | None,
    name: str,
    like_name: str,
    like: torch.Tensor,
    *,
    positive: bool = False,
    allow_int: bool = False,
) -> float | torch.Tensor | None:
    """A per-pair coefficient: ``None``, a finite Python number, or a tensor with the shape of
    ``like``. ``positive=True`` requires every value ``> 0`` (checked on the data)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or (not allow_int and not value.is_floating_point()):
            kind = "a floating or integer" if allow_int else "a floating"
            raise ValueError(f"{name} must be {kind} tensor or a number, got a tensor of dtype {value.dtype}")
        if value.shape != like.shape:
            raise ValueError(f"{name} must be a number or a tensor with the shape of {like_name} {shape_str(like.shape)}, got {shape_str(value.shape)}")
        require_same_device(like_name, like, **{name: value})
        if positive and value.numel() and not bool((value > 0).all()):
            bad = value[~(value > 0)].flatten()[0].item()
            raise ValueError(f"{name} must be > 0 everywhere, got a value {bad}")
        return value
    v = require_finite_float(value, name)
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def reduce_pairs(loss: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``"none"`` → the per-pair tensor; ``"sum"``; ``"mean"`` over all pairs, where an empty
    batch gives 0 (not NaN) so an empty shard never poisons a gradient accumulation."""
    if reduction == "none":
        return loss.to(out_dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    return (total / max(loss.numel(), 1)).to(out_dtype)
