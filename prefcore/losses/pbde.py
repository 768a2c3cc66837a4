r"""Preference behaviour distribution equation (PBDE) losses on sequence log-likelihoods.

Density-estimation paper, eq. (11): the model prefers ``a`` over ``b`` with probability

.. math:: p(a \succ b) = \sigma(\Omega(a) - \Omega(b)),\qquad \Omega(x) = f(x)\,\log p(x) + g(x),\ f(x) > 0.

Training ``log p`` (e.g. a language model's summed token log-probabilities) with the binary
cross-entropy of the observed choice recovers the annotator's implicit preference
distribution when annotator and model share the PBDE (Theorem 2). Special cases:

- Luce choice rule: ``f = 1, g = 0`` (eq. 9);
- length-normalised Luce: ``f = 1/|x|, g = 0`` (eq. 12), which removes the bias towards
  short sequences that raw sequence likelihoods have;
- DPO: ``f = β, g = −β log π_ref`` (eq. 16), i.e. ``Ω = β log(π/π_ref)``.
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
    require_finite_float,
)

Coefficient = float | torch.Tensor


def _omega(logp: torch.Tensor, f: Coefficient, g: Coefficient, acc: torch.dtype) -> torch.Tensor:
    f_t = f.to(acc) if isinstance(f, torch.Tensor) else f
    g_t = g.to(acc) if isinstance(g, torch.Tensor) else g
    return f_t * logp.to(acc) + g_t


def pbde_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    *,
    f_chosen: Coefficient = 1.0,
    f_rejected: Coefficient = 1.0,
    g_chosen: Coefficient = 0.0,
    g_rejected: Coefficient = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Binary cross-entropy of the observed choice under a PBDE (density-estimation eq. 11).

    Shapes: ``logp_chosen``, ``logp_rejected`` any equal shape ``(*,)``, floating — the model's
    log-likelihood of each whole response (sum over its tokens). ``f_*`` (must be ``> 0``
    everywhere) and ``g_*`` are numbers or tensors of that same shape (``f`` tensors may be
    integer). Gradients flow into every tensor argument that requires grad.

    .. math:: \ell = -\log\sigma(\Omega_c - \Omega_r) = \operatorname{softplus}(\Omega_r - \Omega_c),
              \qquad \Omega = f\cdot\log p + g

    ``reduction``: ``"none"`` → ``(*,)``; ``"mean"`` (empty batch → 0) or ``"sum"`` → scalar.
    Computed in float32 (float64 for float64 inputs); returned in the promoted dtype of the
    two log-likelihoods.
    """
    logp_chosen, logp_rejected = pair_tensors("logp_chosen", logp_chosen, "logp_rejected", logp_rejected)
    f_c = per_pair_term(f_chosen, "f_chosen", "logp_chosen", logp_chosen, positive=True, allow_int=True)
    f_r = per_pair_term(f_rejected, "f_rejected", "logp_chosen", logp_chosen, positive=True, allow_int=True)
    g_c = per_pair_term(g_chosen, "g_chosen", "logp_chosen", logp_chosen)
    g_r = per_pair_term(g_rejected, "g_rejected", "logp_chosen", logp_chosen)
    require_choice(reduction, "reduction", REDUCTIONS)
    out_dtype = torch.promote_types(logp_chosen.dtype, logp_rejected.dtype)
    acc = compute_dtype(out_dtype)
    z = _omega(logp_chosen, f_c, g_c, acc) - _omega(logp_rejected, f_r, g_r, acc)
    return reduce_pairs(-F.logsigmoid(z), reduction, out_dtype)  # exact, unlike softplus's threshold


def luce_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    r"""Luce choice rule loss (eq. 9): ``softplus(log p_r − log p_c)``, the PBDE with ``f = 1, g = 0``.

    Minimised (population, well-specified) by ``p = p*``, the annotator's implicit preference
    distribution. Same shapes, dtypes and reductions as :func:`pbde_loss`.
    """
    return pbde_loss(logp_chosen, logp_rejected, reduction=reduction)


def length_normalized_luce_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    len_chosen: Coefficient,
    len_rejected: Coefficient,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Length-normalised Luce loss (eq. 12): the PBDE with ``f(x) = 1/|x|``, ``g = 0``:

    .. math:: \ell = \operatorname{softplus}\Big(\frac{\log p_r}{|x_r|} - \frac{\log p_c}{|x_c|}\Big)

    ``len_chosen``, ``len_rejected``: sequence lengths in tokens, numbers or integer/floating
    tensors with the shape of ``logp_chosen``; every length must be ``> 0`` (``ValueError``
    otherwise — an empty response has no per-token likelihood). Same shapes, dtypes and
    reductions as :func:`pbde_loss`.
    """
    logp_chosen, logp_rejected = pair_tensors("logp_chosen", logp_chosen, "logp_rejected", logp_rejected)
    len_c = per_pair_term(len_chosen, "len_chosen", "logp_chosen", logp_chosen, positive=True, allow_int=True)
    len_r = per_pair_term(len_rejected, "len_rejected", "logp_chosen", logp_chosen, positive=True, allow_int=True)
    acc = compute_dtype(torch.promote_types(logp_chosen.dtype, logp_rejected.dtype))
    f_c = 1.0 / (len_c.to(acc) if isinstance(len_c, torch.Tensor) else len_c)
    f_r = 1.0 / (len_r.to(acc) if isinstance(len_r, torch.Tensor) else len_r)
    return pbde_loss(logp_chosen, logp_rejected, f_chosen=f_c, f_rejected=f_r, reduction=reduction)


def dpo_loss(
    policy_logp_chosen: torch.Tensor,
    policy_logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    beta: float,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""DPO as a PBDE (density-estimation eq. 15–16): ``f = β``, ``g = −β log π_ref``, so

    .. math:: \ell = -\log\sigma\Big(\beta\log\frac{\pi(y_c)}{\pi_{ref}(y_c)} - \beta\log\frac{\pi(y_r)}{\pi_{ref}(y_r)}\Big)

    — the usual DPO loss (Rafailov et al., 2023). All four log-likelihoods have one shape
    ``(*,)``; ``beta > 0`` is a finite number. The reference log-likelihoods are used as given:
    compute them under ``torch.no_grad()`` (as DPO does), or gradients will flow into the
    reference model too. Same dtypes and reductions as :func:`pbde_loss`.
    """
    policy_logp_chosen, policy_logp_rejected = pair_tensors(
        "policy_logp_chosen", policy_logp_chosen, "policy_logp_rejected", policy_logp_rejected
    )
    pair_tensors("policy_logp_chosen", policy_logp_chosen, "ref_logp_chosen", ref_logp_chosen)
    pair_tensors("policy_logp_chosen", policy_logp_chosen, "ref_logp_rejected", ref_logp_rejected)
    beta = require_finite_float(beta, "beta")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    acc = compute_dtype(torch.promote_types(policy_logp_chosen.dtype, policy_logp_rejected.dtype))
    return pbde_loss(
        policy_logp_chosen,
        policy_logp_rejected,
        f_chosen=beta,
        f_rejected=beta,
        g_chosen=-beta * ref_logp_chosen.to(acc),
        g_rejected=-beta * ref_logp_rejected.to(acc),
        reduction=reduction,
    )
