"""Token log-probabilities of a causal LM from its final hidden states — never ``(B, T, V)`` logits.

Every log-prob pass of the policy trainer (policy, reference, old policy) goes through
:func:`completion_logprobs`, which runs the model's trunk (the base model without its LM head) and
hands the hidden states and the head's weight to the fused op :func:`prefcore.ops.token_logprobs`
(tiled over tokens and vocabulary; masked positions are never computed).
"""
from __future__ import annotations

import torch
from torch import nn

from prefcore.ops import token_logprobs


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


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts a linear layer's inputs to on ``device``, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def completion_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, temperature: float = 1.0,
                        return_entropy: bool = False):
    """Log-probs ``(B, Tc)`` float32 of exactly the generated tokens (0 outside ``completion_mask``),
    at the sampling ``temperature`` (as TRL does), and optionally the per-token entropy and the
    hidden states (for a value head). Returns ``(logprobs, entropy | None, hidden)``."""
    base, head = trunk_and_head(model)
    hidden = completion_hidden(base, prompt_ids, prompt_mask, completion_ids, completion_mask)
    # The op takes one dtype for hidden states and weight and accumulates in fp32 either way.
    # Under autocast (``--bf16``) it runs in the autocast dtype, as autocast runs an LM-head
    # linear: the fp32 master weight is cast per call (the cast is differentiable, so its
    # gradient lands in fp32) and the tile products take the op's bf16 path. Without autocast
    # the hidden states follow the head weight's dtype.
    dtype = _autocast_dtype(hidden.device) or head.weight.dtype
    res = token_logprobs(hidden.to(dtype), head.weight.to(dtype), completion_ids, mask=completion_mask.bool(),
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

    def forward(self, prompt_ids, prompt_mask, completion_ids=None, completion_mask=None, temperature: float = 1.0,
                return_entropy: bool = False, sample: dict | None = None):
        if sample is not None:  # sampling runs inside forward, so FSDP2's hooks gather the root's parameters
            from prefcore.train.policy.sampling import sample_completions

            return sample_completions(self.model, prompt_ids, prompt_mask, temperature=temperature, **sample)
        lp, ent, hidden = completion_logprobs(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                              temperature=temperature, return_entropy=return_entropy)
        values = None
        if self.value_head is not None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
            values = values * completion_mask.to(values.dtype)
        return lp, ent, values
