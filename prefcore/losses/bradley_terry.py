"""Bradley–Terry reward-model loss, with the disagreement margin of margin-regularised BT.

Papers: density-estimation-pairwise-preferences eq. (1)–(2) (BT = Luce choice rule on
``exp(r)``); margin-regularized-reward-models eq. (3)–(4) (the margin from n votes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefcore.losses._validation import (
    REDUCTIONS,
    compute_dtype,
    pair_tensors,
    per_pair_term,
    reduce_pairs,
    require_choice,
    require_same_device,
    require_tensor,
    shape_str,
)


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Bradley–Terry negative log-likelihood of the observed choice, optionally with a margin.

    Shapes: ``r_chosen`` and ``r_rejected`` any equal shape ``(*,)`` (batch-first, e.g. ``(B,)``),
    floating; ``margin`` ``None`` (0), a number, or a floating tensor of the same shape.

    .. math:: \ell = -\log\sigma(r_c - r_r - m) = \operatorname{softplus}(m - (r_c - r_r))

    evaluated as ``−logsigmoid(z)`` (``max(−z, 0) + log1p(exp(−|z|))``), so it is accurate to
    the last bit (``F.softplus`` switches to the identity at 20, an error of ~2e-9) and has
    finite gradients (in ``[-1, 0]`` w.r.t. ``r_c``) for any finite rewards, however large the gap. ``m = 0`` is the plain BT loss,
    whose population minimiser under the Luce choice rule is ``exp(r) ∝ p*`` (Theorem 1 of the
    density-estimation paper). With the vote margin of :func:`vote_margin`, ``m ∈ [0, 1]``
    demands a larger reward gap on unanimous pairs than on contested ones (margin paper eq. 4).
    The margin may be any finite value; it is not differentiated through if it is a constant.

    ``reduction``: ``"none"`` → ``(*,)``; ``"mean"`` (an empty batch gives 0) or ``"sum"`` → scalar.
    Computed in float32 (float64 for float64 inputs); returned in the promoted input dtype.
    """
    r_chosen, r_rejected = pair_tensors("r_chosen", r_chosen, "r_rejected", r_rejected)
    margin = per_pair_term(margin, "margin", "r_chosen", r_chosen)
    require_choice(reduction, "reduction", REDUCTIONS)
    out_dtype = torch.promote_types(r_chosen.dtype, r_rejected.dtype)
    acc = compute_dtype(out_dtype)
    z = r_chosen.to(acc) - r_rejected.to(acc)
    if margin is not None:
        z = z - (margin.to(acc) if isinstance(margin, torch.Tensor) else margin)
    return reduce_pairs(-F.logsigmoid(z), reduction, out_dtype)


def vote_margin(votes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Disagreement margin from ``n`` binary votes per pair (margin paper eq. 3).

    ``votes (B, n)``: bool, integer or floating tensor holding only 0/1 (``j_i``: which of the
    two responses vote ``i`` preferred; the margin is symmetric, so either coding works).
    ``mask (B, n)`` bool, optional (True = the vote counts). With ``n_b`` valid votes in row b,

    .. math:: m_b = \frac{|\sum_i j_{bi} - n_b/2|}{n_b/2} \in [0, 1]

    — 1 for a unanimous pair, 0 for an even split. Every row needs at least one valid vote
    (an empty row has no defined margin, and a silent 0 would mark it as maximally contested).

    Returns ``(B,)`` float32 (float64 for float64 votes). Not differentiable (votes are data).
    Raises ``ValueError`` for a wrong shape, a value other than 0/1 among the valid votes, or a
    row without valid votes.
    """
    votes = require_tensor(votes, "votes")
    if votes.dim() != 2:
        raise ValueError(f"votes must have shape (B, n), got {shape_str(votes.shape)}")
    if votes.is_complex():
        raise ValueError(f"votes must be a bool, integer or floating tensor of 0/1, got dtype {votes.dtype}")
    out_dtype = torch.float64 if votes.dtype == torch.float64 else torch.float32
    v = votes.detach().to(out_dtype)
    if mask is not None:
        mask = require_tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != votes.shape:
            raise ValueError(f"mask must have the shape of votes {shape_str(votes.shape)}, got {shape_str(mask.shape)}")
        require_same_device("votes", votes, mask=mask)
        valid = mask
    else:
        valid = torch.ones_like(v, dtype=torch.bool)
    not_binary = valid & (v != 0) & (v != 1)
    if bool(not_binary.any()):
        row, col = (int(i) for i in not_binary.nonzero()[0])
        raise ValueError(f"votes must be 0 or 1, got {votes[row, col].item()} at votes[{row}, {col}]")
    n = valid.sum(-1).to(out_dtype)
    if votes.shape[0] and bool((n == 0).any()):
        row = int((n == 0).nonzero()[0, 0])
        raise ValueError(f"every row of votes needs at least one valid vote (mask), row {row} has none")
    s = torch.where(valid, v, torch.zeros_like(v)).sum(-1)
    half = n / 2
    return (s - half).abs() / half.clamp_min(0.5)
