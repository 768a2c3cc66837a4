"""Sequence pooling over a transformers backbone that does not depend on padding or batch size.

The batch is first re-laid out with every row's valid tokens packed to the left (right
padding), in their original order. After that, a token's position is its index among the
row's valid tokens whatever padding side, interior padding or batch the caller used, so the
backbone computes the same thing for a sequence alone and inside any padded batch — also for
backbones that ignore or do not accept ``position_ids`` (absolute-position models counting
from the left, e.g. GPT-2 without position ids). Position ids derived from the mask
(``cumsum(mask) − 1``) are passed as well whenever the backbone's ``forward`` accepts them.
With causal attention the padding after a sequence is never attended to; for bidirectional
encoders the attention mask hides it.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from prefcore.ops._checks import require_choice, require_tensor, shape_str

POOLINGS = ("last", "mean")


def check_batch(input_ids: object, attention_mask: object | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``input_ids (B, T)`` (integer) and ``attention_mask (B, T)`` (bool or 0/1 integers;
    None = all valid); return ``(input_ids, mask)`` with ``mask`` bool. The batch must not be
    empty and every row must hold at least one valid token (there is nothing to pool otherwise);
    checking that reads the mask (one device sync per batch)."""
    ids = require_tensor(input_ids, "input_ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {shape_str(ids.shape)}")
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        am = require_tensor(attention_mask, "attention_mask")
        if am.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {shape_str(ids.shape)}, got {shape_str(am.shape)}")
        if am.device != ids.device:
            raise ValueError(f"attention_mask must be on the device of input_ids ({ids.device}), got {am.device}")
        if am.dtype == torch.bool:
            mask = am
        elif am.dtype.is_floating_point or am.dtype.is_complex:
            raise ValueError(f"attention_mask must be bool or integer (0/1), got {am.dtype}")
        else:
            if am.numel() and not bool(((am == 0) | (am == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1")
            mask = am.bool()
    if ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one sequence, got shape {shape_str(ids.shape)}")
    has_token = mask.any(-1)
    if not bool(has_token.all()):
        empty = (~has_token).nonzero().flatten().tolist()
        raise ValueError(f"every sequence needs at least one attended token; rows {empty[:8]} of attention_mask have none")
    return ids, mask


def pack_left(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the front (order kept), padding after them.

    ``input_ids (B, T)``, ``mask (B, T)`` bool → the same shapes; pad slots keep some token id of
    the row (their value is irrelevant: they are masked out)."""
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    return input_ids.gather(-1, order), mask.gather(-1, order)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int64 positions: each valid token's index among its row's valid tokens
    (``cumsum(mask) − 1``), 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def backbone_hidden_states(backbone: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run ``backbone`` on an already left-packed batch; return the last hidden states ``(B, T, D)``.

    A transformers model with a task head (e.g. ``…ForCausalLM``) is run through its
    ``base_model`` so the output is hidden states, never logits."""
    backbone = getattr(backbone, "base_model", backbone)
    kwargs: dict[str, object] = {"input_ids": input_ids, "attention_mask": mask.long()}
    if _accepts(backbone, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(mask)
    if _accepts(backbone, "use_cache"):
        kwargs["use_cache"] = False  # no KV cache: nothing is generated, and it would cost memory
    out = backbone(**kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
        got = shape_str(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"backbone must return hidden states of shape (B, T, D) = {shape_str(tuple(input_ids.shape) + ('D',))}, got {got}")
    return hidden


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Pool ``hidden (B, T, D)`` over the valid tokens of ``mask (B, T)`` → ``(B, D)``.

    ``"last"``: the hidden state of each row's last valid token (for a causal model, the one
    that has read the whole sequence). ``"mean"``: the mean over valid tokens, summed in float32
    at least and returned in the hidden states' dtype."""
    require_choice(pooling, "pooling", POOLINGS)
    if pooling == "last":
        t = torch.arange(mask.shape[-1], device=mask.device)
        last = torch.where(mask, t, -1).amax(-1)  # index of the last valid token per row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = mask.to(acc).unsqueeze(-1)
    return ((hidden.to(acc) * w).sum(1) / w.sum(1).clamp_min(1.0)).to(hidden.dtype)


def pooled_features(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    pooling: str = "last") -> torch.Tensor:
    """Pooled backbone features ``(B, D)`` of a padded batch; independent of the padding side,
    of interior padding and of the other rows of the batch (up to floating-point rounding)."""
    require_choice(pooling, "pooling", POOLINGS)
    param = next(iter(backbone.parameters()), None)
    if param is not None and param.device != require_tensor(input_ids, "input_ids").device:
        raise ValueError(f"input_ids must be on the backbone's device ({param.device}), got {input_ids.device}")
    ids, mask = check_batch(input_ids, attention_mask)
    ids, mask = pack_left(ids, mask)
    width = int(mask.sum(-1).max())  # columns after the longest packed row hold only padding
    ids, mask = ids[:, :width], mask[:, :width]
    return pool(backbone_hidden_states(backbone, ids, mask), mask, pooling)
