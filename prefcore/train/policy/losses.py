"""Per-token policy and value losses and their aggregation (``loss_agg_mode``, formulas in
:mod:`prefcore.train.policy.config`).

Aggregation is split into a *numerator* summed over micro-batches and a *denominator* fixed for
the whole optimisation step (all micro-batches, all ranks), so the gradient is the same however
the step's completions are split across accumulation steps and ranks.
"""
from __future__ import annotations

import torch


def agg_numerator(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The micro-batch's share of the loss numerator: ``Σ m·ℓ`` (token-mean, seq-mean-token-sum,
    seq-sum-norm) or ``Σ_i Σ_t m·ℓ / max(1, Σ_t m)`` (seq-mean-token-mean)."""
    m = mask.to(per_token.dtype)
    if mode == "seq-mean-token-mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()
    return (per_token * m).sum()


def agg_denominator(mode: str, n_tokens: float, n_seqs: float, max_len: int) -> float:
    """The step-wide normaliser: tokens (token-mean), sequences (seq-mean-*), sequences × L (seq-sum-norm)."""
    if mode == "token-mean":
        return max(1.0, n_tokens)
    if mode == "seq-sum-norm":
        return max(1.0, n_seqs * max_len)
    return max(1.0, n_seqs)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                        eps_low: float, eps_high: float, clip_ratio_c: float | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate ``(B, T)`` and the clipped-token indicator.

    ``r = exp(lp − lp_old)``; ``ℓ = max(−A·r, −A·clip(r, 1 − eps_low, 1 + eps_high))``; with the dual
    clip ``c`` (> 1), tokens with ``A < 0`` use ``min(ℓ, −A·c)`` (bounds the loss of a huge ratio)."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if clip_ratio_c is not None:
        pg3 = -advantages * clip_ratio_c
        dual = (advantages < 0) & (pg3 < loss)
        loss = torch.where(advantages < 0, torch.minimum(loss, pg3), loss)
        clipped = clipped | dual
    return loss, clipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       cliprange: float) -> torch.Tensor:
    """Per-token ``½·max((V − R)², (V_clip − R)²)``, ``V_clip = V_old + clip(V − V_old, ±cliprange)``."""
    v_clip = old_values + torch.clamp(values - old_values, -cliprange, cliprange)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """GRPO's KL loss term per token: ``exp(ref − lp) − (ref − lp) − 1`` (≥ 0, unbiased for KL(π‖π_ref))."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


class AdaptiveKL:
    """β controller toward ``target`` (verl / OpenRLHF): ``err = clip(KL/target − 1, −0.2, 0.2)``,
    ``β ← β·(1 + err·n/horizon)`` with ``n`` the completions of the step. ``target=None``: fixed β."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = float(beta), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        err = min(0.2, max(-0.2, kl / self.target - 1.0))
        self.beta *= 1.0 + err * n / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
