"""Token log-probabilities of a causal LM from its final hidden states — never ``(B, T, V)`` logits.

Every log-prob pass of the policy trainer (policy, reference, old policy) goes through
:func:`completion_logprobs`, which runs the model's trunk (the base model without its LM head) and
hands the hidden states and the head's weight to :func:`_token_logprobs`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Rows of the (rows, V) logits block one chunk may build (about 16 MiB of fp32 at V = 32k).
_CHUNK_ELEMENTS = 1 << 22


def _chunk_stats(h: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, temperature: float,
                 want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = (h.to(acc) @ weight.to(acc).t()) / temperature  # (n, V) for one chunk only
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, tgt[:, None]).squeeze(-1) - lse
    if want_entropy:
        ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    else:
        ent = torch.zeros_like(lp)
    return lp, ent


# REPLACE-WITH-OP: prefcore.ops.token_logprobs (DESIGN §3.5) is being written on another branch; this
# pure-PyTorch stand-in has its exact signature and semantics. Swap the call in completion_logprobs.
def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    mask: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False):
    """``logprob = z[target] − logsumexp(z)`` with ``z = hidden·weightᵀ/temperature`` (fp32
    accumulation, fp64 for fp64), ``hidden (*, H)``, ``weight (V, H)``, ``targets (*,)`` int,
    ``mask (*,)`` bool. Returns float32 ``(*,)`` (or ``(logprobs, entropy)`` with
    ``entropy = logsumexp(z) − Σ softmax(z)·z``). Masked positions are 0, not computed, have zero
    gradient and their target is ignored. Works in token chunks; with autograd each chunk is
    recomputed in backward (activation checkpointing), so no ``(N, V)`` block is ever kept."""
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden (*, H) and weight (V, H) must share H, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64/int32, got {targets.dtype}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if mask is None:
        mask = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
    elif mask.shape != targets.shape:
        raise ValueError(f"mask must have shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    v = weight.shape[0]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    tgt = targets.reshape(-1)[idx].long()
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= v):
        raise ValueError(f"targets must lie in [0, {v}) on valid tokens, got range [{int(tgt.min())}, {int(tgt.max())}]")
    h = flat_h.index_select(0, idx)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    chunk = max(1, _CHUNK_ELEMENTS // max(1, v))
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    lps, ents = [], []
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], weight, tgt[s:s + chunk], float(temperature), return_entropy)
        lp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args)
        lps.append(lp)
        ents.append(ent)
    out_lp = torch.zeros(flat_h.shape[0], dtype=acc, device=hidden.device)
    out_ent = torch.zeros(flat_h.shape[0], dtype=acc, device=hidden.device)
    if lps:
        out_lp = out_lp.index_put((idx,), torch.cat(lps))
        out_ent = out_ent.index_put((idx,), torch.cat(ents))
    out_lp = out_lp.reshape(targets.shape)
    if return_entropy:
        return out_lp, out_ent.reshape(targets.shape)
    return out_lp


def unwrap(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under DDP/FSDP/peft wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The causal LM's trunk (``model.base_model``: embeddings + blocks + final norm, returning
    hidden states) and its LM head. The head must be a bias-free ``nn.Linear``, the only kind the
    fused log-prob op covers (``z = h·Wᵀ``)."""
    m = unwrap(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    base = getattr(m, "base_model", None)
    if not isinstance(head, nn.Linear) or base is None or base is m:
        raise ValueError(f"model: expected a transformers causal LM (a trunk `base_model` and an nn.Linear "
                         f"LM head from get_output_embeddings()), got {type(m).__name__}")
    if head.bias is not None:
        raise ValueError(f"model: the LM head of {type(m).__name__} has a bias; token_logprobs needs a bias-free head")
    return base, head


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: ``cumsum(mask) − 1``, clamped at 0 on pads."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_hidden(trunk: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states ``(B, Tc, H)`` that predict each completion token.

    The sequence is ``[prompt (B, Lp), left-padded | completion (B, Tc), right-padded]``; hidden
    state ``t`` predicts token ``t + 1``, so completion token ``j`` is predicted at position
    ``Lp − 1 + j``. Padding (left of the prompt, after the completion's EOS) is masked out of
    attention and the positions count real tokens only."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attn = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    out = trunk(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    lp = prompt_ids.shape[1]
    return hidden[:, lp - 1: lp - 1 + completion_ids.shape[1]]


def completion_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, temperature: float = 1.0,
                        return_entropy: bool = False):
    """Log-probs ``(B, Tc)`` float32 of exactly the generated tokens (0 outside ``completion_mask``),
    at the sampling ``temperature`` (as TRL does), and optionally the per-token entropy and the
    hidden states (for a value head). Returns ``(logprobs, entropy | None, hidden)``."""
    base, head = trunk_and_head(model)
    hidden = completion_hidden(base, prompt_ids, prompt_mask, completion_ids, completion_mask)
    res = _token_logprobs(hidden, head.weight, completion_ids, mask=completion_mask.bool(),
                          temperature=temperature, return_entropy=return_entropy)
    if return_entropy:
        return res[0], res[1], hidden
    return res, None, hidden


class PolicyWithValue(nn.Module):
    """The trainable module of a run — the causal LM and (PPO) a value head ``nn.Linear(H, 1)`` on
    its trunk's final hidden state — with one forward that returns, for the completion tokens,
    ``(logprobs (B, Tc), entropy (B, Tc) | None, values (B, Tc) | None)``. Wrapping this one module
    in DDP puts every trainable parameter (LM head included) under DDP's gradient all-reduce."""

    def __init__(self, model: nn.Module, value_head: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                return_entropy: bool = False):
        lp, ent, hidden = completion_logprobs(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                              temperature=temperature, return_entropy=return_entropy)
        values = None
        if self.value_head is not None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
            values = values * completion_mask.to(values.dtype)
        return lp, ent, values
