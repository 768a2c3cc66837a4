"""Pure-PyTorch reference implementations of every prefcore op (same signatures).

For tests and benchmarks only — the package never falls back to these. They are written
the obvious way (materialising broadcasts) and compute in the dtype of their inputs, so a
reference call in bfloat16 is "plain PyTorch in low precision", the baseline the tolerance
rule in the tests compares against.
"""
from __future__ import annotations

import math

import torch

# ---- quantile family (DESIGN §3.1, §3.3) ------------------------------------------------


def pinball_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    taus: torch.Tensor,
    target_mask: torch.Tensor | None = None,
    *,
    kappa: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference of :func:`prefcore.ops.pinball_loss`; builds the ``(*, N, Q)`` broadcast."""
    dtype = pred.dtype
    t = target.to(dtype)
    if t.dim() == pred.dim() - 1:
        t = t.unsqueeze(-1)
        target_mask = target_mask.unsqueeze(-1) if target_mask is not None else None
    taus = torch.as_tensor(taus, dtype=dtype, device=pred.device)
    u = t.unsqueeze(-1) - pred.unsqueeze(-2)  # (*, N, Q)
    below = (u < 0).to(dtype)
    if kappa == 0:
        rho = u * (taus - below)
    else:
        a = u.abs()
        huber = torch.where(a <= kappa, 0.5 * u * u, kappa * (a - 0.5 * kappa))
        rho = (taus - below).abs() * huber / kappa
    per_target = rho.mean(-1)  # (*, N)
    if target_mask is None:
        valid = torch.ones_like(per_target)
    else:
        valid = target_mask.to(dtype)
    n_valid = valid.sum(-1)
    row = (per_target * valid).sum(-1) / n_valid.clamp_min(1)
    row = torch.where(n_valid > 0, row, torch.zeros_like(row))
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / (n_valid > 0).sum().clamp_min(1).to(dtype)


def exp_utility(
    quantiles: torch.Tensor,
    lam: float | torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    kind: str = "ce",
) -> torch.Tensor:
    """Reference of :func:`prefcore.ops.exp_utility` (plain logsumexp; no small-λ care)."""
    x = (gate.unsqueeze(-1) * quantiles).sum(-2) if gate is not None else quantiles
    lam_t = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    lam_col = lam_t.reshape(-1, 1) if lam_t.dim() == 1 else lam_t
    if kind == "utility":
        return -torch.exp(-lam_col * x).mean(-1)
    lam_row = lam_col.reshape(-1) if lam_t.dim() == 1 else lam_t
    is_zero = lam_row == 0
    safe_col = torch.where(lam_col == 0, torch.ones_like(lam_col), lam_col)
    safe_row = torch.where(is_zero, torch.ones_like(lam_row), lam_row)
    ce = -(torch.logsumexp(-safe_col * x, dim=-1) - math.log(x.shape[-1])) / safe_row
    return torch.where(is_zero, x.mean(-1), ce)


# ---- Gaussian-mixture family (DESIGN §3.2) ----------------------------------------------


def gmm_nll(
    logits: torch.Tensor,
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    points: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    normalize_grid: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference of :func:`prefcore.ops.gmm_nll`; builds the ``(*, K, G|N)`` broadcast."""
    dtype = logits.dtype
    x = points.to(dtype)
    log_pi = torch.log_softmax(logits, dim=-1)
    z = (x.unsqueeze(-2) - mu.unsqueeze(-1)) / torch.exp(log_sigma).unsqueeze(-1)  # (*, K, P)
    comp = (log_pi - log_sigma - 0.5 * math.log(2 * math.pi)).unsqueeze(-1) - 0.5 * z * z
    log_p = torch.logsumexp(comp, dim=-2)  # (*, P)
    if normalize_grid:
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    w = torch.ones_like(log_p) if weights is None else weights.to(dtype).expand_as(log_p)
    total = w.sum(-1)
    has_weight = total > 0
    row = -(w * log_p).sum(-1) / torch.where(has_weight, total, torch.ones_like(total))
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / has_weight.sum().clamp_min(1).to(dtype)


# ---- KL-penalised advantages (DESIGN §3.4) ----------------------------------------------
