r"""Evaluation metrics for (distributional) reward models and policies (DESIGN §4).

Batch-first torch functions; each docstring gives the exact formula. Conventions shared by all:

* Scores/targets per item are ``(B,)`` (one per item) or ``(B, N)`` (N annotators/evaluators),
  with an optional bool ``mask`` of the same shape (True = valid). More leading dims are allowed
  wherever ``(B, …)`` is written, and are treated as more items.
* Per-item metrics take ``reduction``: ``"none"`` → ``(B,)``, ``"mean"`` → scalar mean over the
  items that have at least one valid score. An item without a valid score gets 0 under
  ``"none"`` and is left out of the mean; with no valid item at all the mean is 0 — the
  convention of :func:`prefcore.ops.pinball_loss`, so no metric returns NaN for missing data.
* Computation in float32 (float64 for float64 inputs); results in the accumulation dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from prefcore.distributions import Distribution, GaussianMixture, QuantileDistribution, ndtr
from prefcore.ops._checks import (
    opmath_dtype,
    require_bool,
    require_choice,
    require_finite_float,
    require_floating,
    require_same_device,
    shape_str,
)
from prefcore.ops.quantile import pinball_loss

__all__ = [
    "pairwise_accuracy",
    "pearson",
    "l1",
    "quantile_coverage",
    "crps",
    "crps_quantile",
    "crps_gmm",
    "nll",
    "uce",
    "das",
    "crr",
    "pmr",
]

REDUCTIONS = ("none", "mean")
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---- argument handling --------------------------------------------------------------------


def _same_shape(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {shape_str(a.shape)}, got {shape_str(b.shape)}")
    require_same_device(a_name, a, **{b_name: b})


def _targets(targets: object, mask: object | None, batch: torch.Size, name: str = "targets",
             mask_name: str = "mask") -> tuple[Tensor, Tensor]:
    """``targets (*batch,)`` or ``(*batch, N)`` → ``(*batch, N)`` and its mask ``(*batch, N)`` bool."""
    t = require_floating(targets, name)
    if tuple(t.shape) == tuple(batch):
        t2 = t.unsqueeze(-1)
    elif t.dim() == len(batch) + 1 and tuple(t.shape[:-1]) == tuple(batch):
        t2 = t
    else:
        raise ValueError(
            f"{name} must have shape {shape_str(tuple(batch))} or {shape_str(tuple(batch) + ('N',))} "
            f"to match the batch, got {shape_str(t.shape)}"
        )
    if mask is None:
        m2 = torch.ones(t2.shape, dtype=torch.bool, device=t2.device)
    else:
        m = require_bool(mask, mask_name)
        _same_shape(t, name, m, mask_name)
        m2 = m.reshape(t2.shape)
    return t2, m2


def _reduce(per_item: Tensor, has: Tensor, reduction: str) -> Tensor:
    per_item = torch.where(has, per_item, torch.zeros_like(per_item))
    if reduction == "none":
        return per_item
    return per_item.sum() / has.sum().clamp(min=1).to(per_item.dtype)


def _masked_mean(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of ``x`` over the valid entries of the last dim → (mean, count, has-any)."""
    acc = opmath_dtype(x.dtype)
    mf = m.to(acc)
    xs = torch.where(m, x.to(acc), torch.zeros((), dtype=acc, device=x.device))
    cnt = mf.sum(-1)
    return xs.sum(-1) / cnt.clamp(min=1.0), cnt, cnt > 0


def _dist_device(dist: Distribution) -> torch.device:
    return dist.values.device if isinstance(dist, QuantileDistribution) else dist.logits.device


# ---- point-reward metrics -----------------------------------------------------------------


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor, *, tie: float = 0.5) -> Tensor:
    r"""Fraction of pairs ranked correctly, scalar:
    :math:`\frac1B\sum_b \big(1[r^c_b > r^r_b] + \text{tie}\cdot 1[r^c_b = r^r_b]\big)`.

    ``r_chosen``, ``r_rejected``: same shape, any; all elements are pairs. ``tie`` ∈ [0, 1] is
    the credit for an exact tie (0.5: a constant model scores chance). Empty input → 0.
    """
    c = require_floating(r_chosen, "r_chosen")
    r = require_floating(r_rejected, "r_rejected")
    _same_shape(c, "r_chosen", r, "r_rejected")
    tie = require_finite_float(tie, "tie", min_value=0.0)
    if tie > 1:
        raise ValueError(f"tie must lie in [0, 1], got {tie}")
    acc = opmath_dtype(c.dtype)
    hit = (c > r).to(acc) + tie * (c == r).to(acc)
    return hit.sum() / max(hit.numel(), 1)


def pearson(x: Tensor, y: Tensor, *, dim: int = -1) -> Tensor:
    r"""Pearson correlation along ``dim`` (default the last), ``x.shape`` without ``dim``:
    :math:`\rho = \frac{\sum_i (x_i-\bar x)(y_i-\bar y)}{\sqrt{\sum_i (x_i-\bar x)^2\,\sum_i (y_i-\bar y)^2}}`.

    E.g. RM preference vs. aggregate user preference (margin paper, Table 1). Undefined when
    either input is constant along ``dim`` (or has fewer than 2 elements); 0 is returned then.
    """
    x = require_floating(x, "x")
    y = require_floating(y, "y")
    _same_shape(x, "x", y, "y")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    acc = opmath_dtype(x.dtype)
    xc = x.to(acc) - x.to(acc).mean(dim, keepdim=True)
    yc = y.to(acc) - y.to(acc).mean(dim, keepdim=True)
    den = torch.sqrt((xc * xc).sum(dim) * (yc * yc).sum(dim))
    num = (xc * yc).sum(dim)
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den)).clamp(-1.0, 1.0)


def l1(x: Tensor, y: Tensor, *, dim: int = -1) -> Tensor:
    r"""Mean absolute difference along ``dim``: :math:`\frac1n\sum_i |x_i - y_i|`.

    The margin paper's Table 2 metric: RM preference :math:`\sigma(r_A - r_B)` vs. the aggregate
    user preference (fraction preferring A). Empty along ``dim`` → 0.
    """
    x = require_floating(x, "x")
    y = require_floating(y, "y")
    _same_shape(x, "x", y, "y")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    acc = opmath_dtype(x.dtype)
    d = (x.to(acc) - y.to(acc)).abs()
    return d.sum(dim) / max(d.shape[dim], 1)


# ---- distributional metrics ---------------------------------------------------------------


def _check_quantile_set(values: object, taus: object) -> tuple[Tensor, Tensor]:
    values = require_floating(values, "values")
    taus = require_floating(taus, "taus")
    if values.dim() < 1 or values.shape[-1] < 1:
        raise ValueError(f"values must have shape (B, Q) with Q >= 1, got {shape_str(values.shape)}")
    q = values.shape[-1]
    if taus.dim() != 1 or taus.shape[0] != q:
        raise ValueError(f"taus must have shape (Q,) = ({q},) to match values {shape_str(values.shape)}, got {shape_str(taus.shape)}")
    require_same_device("values", values, taus=taus)
    if not bool(((taus > 0) & (taus < 1)).all()):
        raise ValueError(f"taus must lie strictly inside (0, 1), got min {taus.min().item()}, max {taus.max().item()}")
    return values, taus


def quantile_coverage(values: Tensor, taus: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Per-level coverage, ``(Q,)``: the fraction of valid targets at or below the predicted
    τ-quantile, pooled over all valid (item, target) pairs:
    :math:`c_q = \frac{\sum_{b,n} m_{bn}\,1[y_{bn} \le v_{bq}]}{\sum_{b,n} m_{bn}}`.

    A calibrated model has :math:`c_q \approx \tau_q`. ``values (B, Q)``, ``taus (Q,)`` in (0, 1),
    ``targets (B,)`` or ``(B, N)``, ``mask`` like ``targets``. No valid target → zeros.
    """
    values, taus = _check_quantile_set(values, taus)
    y, m = _targets(targets, mask, values.shape[:-1])
    require_same_device("values", values, targets=y, mask=m)
    acc = opmath_dtype(values.dtype)
    below = (y.to(acc).unsqueeze(-1) <= values.to(acc).unsqueeze(-2)) & m.unsqueeze(-1)  # (B, N, Q)
    q = values.shape[-1]
    hits = below.reshape(-1, q).to(acc).sum(0)
    return hits / m.sum().clamp(min=1).to(acc)


def crps_quantile(values: Tensor, taus: Tensor, targets: Tensor, mask: Tensor | None = None, *,
                  reduction: str = "mean") -> Tensor:
    r"""CRPS of a quantile set by the quantile decomposition
    :math:`\mathrm{CRPS}(F, y) = 2\int_0^1 \rho_\tau(y - F^{-1}(\tau))\,d\tau`, discretised on the
    given levels: :math:`\frac{2}{Q}\sum_q \rho_{\tau_q}(y - v_q)` with
    :math:`\rho_\tau(u) = u(\tau - 1[u<0])`, averaged over the item's valid targets
    (= 2 × :func:`prefcore.ops.pinball_loss`). Approximates the CRPS well for many evenly spaced
    levels. ``values (B, Q)``, ``taus (Q,)``, ``targets (B,)`` or ``(B, N)``.
    """
    values, taus = _check_quantile_set(values, taus)
    require_choice(reduction, "reduction", REDUCTIONS)
    y, m = _targets(targets, mask, values.shape[:-1])
    acc = opmath_dtype(values.dtype)
    y = torch.where(m, y.to(acc), torch.zeros((), dtype=acc, device=y.device))  # padding may be NaN
    rows = pinball_loss(values.to(acc), y, taus.to(acc), m, reduction="none")
    return _reduce(2.0 * rows, m.any(-1), reduction)


def _a_fn(mu: Tensor, sigma: Tensor) -> Tensor:
    r""":math:`A(\mu, \sigma) = \mathbb{E}|X|` for :math:`X \sim \mathcal{N}(\mu, \sigma^2)`:
    :math:`\mu(2\Phi(\mu/\sigma) - 1) + 2\sigma\varphi(\mu/\sigma)`."""
    z = mu / sigma
    return mu * (2.0 * ndtr(z) - 1.0) + 2.0 * sigma * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def crps_gmm(dist: GaussianMixture, targets: Tensor, mask: Tensor | None = None, *,
             reduction: str = "mean") -> Tensor:
    r"""Closed-form CRPS of a Gaussian mixture (Grimit et al. 2006), averaged over each item's
    valid targets: with :math:`\mathrm{CRPS}(F, y) = \mathbb{E}|X - y| - \tfrac12\mathbb{E}|X - X'|`,

    :math:`\mathrm{CRPS} = \sum_k \pi_k A(y - \mu_k, \sigma_k) - \tfrac12\sum_{k,l}\pi_k\pi_l A(\mu_k - \mu_l, \sqrt{\sigma_k^2 + \sigma_l^2})`,
    :math:`A(\mu, \sigma) = \mu(2\Phi(\mu/\sigma) - 1) + 2\sigma\varphi(\mu/\sigma)`.

    ``dist`` batch ``(B,)``; ``targets (B,)`` or ``(B, N)``.
    """
    if not isinstance(dist, GaussianMixture):
        raise TypeError(f"dist must be a GaussianMixture, got {type(dist).__name__}")
    require_choice(reduction, "reduction", REDUCTIONS)
    y, m = _targets(targets, mask, dist.batch_shape)
    require_same_device("dist", torch.empty(0, device=_dist_device(dist)), targets=y)
    _, w, mu, sigma = dist._params()
    y = y.to(mu.dtype)
    # E|X - y| per target: (B, N, K) summed over components.
    e_xy = (w.unsqueeze(-2) * _a_fn(y.unsqueeze(-1) - mu.unsqueeze(-2), sigma.unsqueeze(-2))).sum(-1)
    # E|X - X'|: (B, K, K).
    s2 = sigma * sigma
    e_xx = (w.unsqueeze(-1) * w.unsqueeze(-2)
            * _a_fn(mu.unsqueeze(-1) - mu.unsqueeze(-2), torch.sqrt(s2.unsqueeze(-1) + s2.unsqueeze(-2)))).sum((-1, -2))
    per_target = e_xy - 0.5 * e_xx.unsqueeze(-1)
    per_item, _, has = _masked_mean(per_target, m)
    return _reduce(per_item, has, reduction)


def crps(dist: Distribution, targets: Tensor, mask: Tensor | None = None, *, reduction: str = "mean") -> Tensor:
    """CRPS of ``dist`` against observed scores: :func:`crps_quantile` on ``(values, taus)`` for a
    :class:`QuantileDistribution`, :func:`crps_gmm` for a :class:`GaussianMixture`."""
    if isinstance(dist, QuantileDistribution):
        return crps_quantile(dist.values, dist.taus, targets, mask, reduction=reduction)
    if isinstance(dist, GaussianMixture):
        return crps_gmm(dist, targets, mask, reduction=reduction)
    raise TypeError(f"dist must be a QuantileDistribution or a GaussianMixture, got {type(dist).__name__}")


def nll(dist: GaussianMixture, targets: Tensor, mask: Tensor | None = None, *, reduction: str = "mean") -> Tensor:
    r"""Negative log-likelihood of observed scores under a Gaussian mixture, per item the mean
    over its valid scores: :math:`-\frac1{N_b}\sum_n m_{bn}\log p_b(y_{bn})` (the exact,
    empirical form of DFL eq. 3). ``dist`` batch ``(B,)``; ``targets (B,)`` or ``(B, N)``."""
    if not isinstance(dist, GaussianMixture):
        raise TypeError(f"dist must be a GaussianMixture, got {type(dist).__name__}")
    require_choice(reduction, "reduction", REDUCTIONS)
    y, m = _targets(targets, mask, dist.batch_shape)
    require_same_device("dist", torch.empty(0, device=_dist_device(dist)), targets=y)
    acc = opmath_dtype(dist.logits.dtype)
    y = torch.where(m, y.to(acc), torch.zeros((), dtype=acc, device=y.device))  # padding may be NaN
    lp = dist.log_prob(y).to(acc)
    per_item, _, has = _masked_mean(-lp, m)
    return _reduce(per_item, has, reduction)


def uce(pred_var: Tensor | Distribution, scores: Tensor, mask: Tensor | None = None, *, unbiased: bool = False) -> Tensor:
    r"""Uncertainty calibration error (DFL §4.3), scalar: the mean squared error between the
    predicted variance and the empirical variance of the item's scores,
    :math:`\frac1{|I|}\sum_{b\in I}(\hat\sigma^2_b - s^2_b)^2`,
    :math:`s^2_b = \frac1{N_b - d}\sum_n m_{bn}(y_{bn} - \bar y_b)^2` with d = 0 (population
    variance, default) or 1 (``unbiased=True``). I = items with more than d valid scores.

    ``pred_var``: ``(B,)`` tensor or a distribution with batch ``(B,)`` (its ``variance()``);
    ``scores (B, N)``, ``mask (B, N)``.
    """
    if isinstance(pred_var, (QuantileDistribution, GaussianMixture)):
        pv = pred_var.variance()
    else:
        pv = require_floating(pred_var, "pred_var")
    if pv.dim() < 1:
        raise ValueError(f"pred_var must have shape (B,), got {shape_str(pv.shape)}")
    y = require_floating(scores, "scores")
    if y.dim() != pv.dim() + 1 or y.shape[:-1] != pv.shape:
        raise ValueError(f"scores must have shape {shape_str(tuple(pv.shape) + ('N',))} to match pred_var, got {shape_str(y.shape)}")
    y, m = _targets(y, mask, pv.shape, name="scores")
    require_same_device("pred_var", pv, scores=y)
    if not isinstance(unbiased, bool):
        raise ValueError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    acc = opmath_dtype(y.dtype)
    mean, cnt, _ = _masked_mean(y, m)
    dev = torch.where(m, y.to(acc) - mean.unsqueeze(-1), torch.zeros((), dtype=acc, device=y.device))
    ddof = 1.0 if unbiased else 0.0
    has = cnt > ddof
    emp = (dev * dev).sum(-1) / (cnt - ddof).clamp(min=1.0)
    err = (pv.to(acc) - emp) ** 2
    return _reduce(err, has, "mean")


def das(p: Tensor, q: Tensor, *, reduction: str = "mean") -> Tensor:
    r"""Distributional alignment score (DFL eq. 6):
    :math:`\mathrm{DAS} = \frac1B\sum_b \exp(-D_{KL}(p_b \,\|\, q_b))`, in (0, 1], 1 iff equal.

    DFL compares the empirical distribution of human ratings of the evaluated output
    (:math:`p_b = \hat p(r \mid x_b, y_b)`) with a reference distribution
    (:math:`q_b = \hat p(r \mid x_b, y_{ref})`). Both are continuous in the paper; here they are
    **discretised on one shared grid** of G reward values: ``p, q (B, G)`` non-negative, each row
    normalised to sum 1 inside (build them with :func:`prefcore.distributions.grid_histogram`
    from scores, or :func:`prefcore.distributions.grid_probabilities` from a fitted/predicted
    distribution). :math:`D_{KL}(p\|q) = \sum_g p_g\log(p_g/q_g)` with :math:`0\log(0/q) = 0`;
    mass of p where q is 0 gives KL = ∞ and a score of 0. Rows of p or q that sum to 0 are
    invalid input (ValueError). ``reduction``: ``"none"`` → ``(B,)``, ``"mean"`` → scalar.
    """
    p = require_floating(p, "p")
    q = require_floating(q, "q")
    _same_shape(p, "p", q, "q")
    require_choice(reduction, "reduction", REDUCTIONS)
    if p.dim() < 1 or p.shape[-1] < 1:
        raise ValueError(f"p must have shape (B, G) with G >= 1, got {shape_str(p.shape)}")
    acc = opmath_dtype(p.dtype)
    p, q = p.to(acc), q.to(acc)
    if p.numel():
        if not bool(((p >= 0) & (q >= 0)).all()) or not bool(torch.isfinite(p).all() & torch.isfinite(q).all()):
            raise ValueError("p and q must be finite and non-negative")
        if not bool(((p.sum(-1) > 0) & (q.sum(-1) > 0)).all()):
            raise ValueError("every row of p and q must have a positive sum (a distribution on the grid)")
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    pos = p > 0
    ratio = torch.where(pos, p / torch.where(q > 0, q, torch.ones_like(q)), torch.ones_like(p))
    terms = torch.where(pos & (q > 0), p * torch.log(ratio), torch.zeros_like(p))
    terms = torch.where(pos & (q <= 0), torch.full_like(p, math.inf), terms)
    score = torch.exp(-terms.sum(-1))
    if reduction == "none":
        return score
    return score.sum() / max(score.numel(), 1)


# ---- policy-evaluation rates (DFL §4.3) ---------------------------------------------------


def crr(scores: Tensor, mask: Tensor | None = None, *, threshold: float = -0.7) -> Tensor:
    r"""Catastrophic response rate (DFL §4.3), scalar: the fraction of responses that **any**
    evaluator scores strictly below ``threshold`` (DFL: −0.7 on [−1, 1]),
    :math:`\frac1{|I|}\sum_{b\in I} 1[\exists n: m_{bn} \wedge y_{bn} < \text{threshold}]`,
    I = responses with at least one valid score. ``scores (B,)`` or ``(B, N)``.
    """
    y = require_floating(scores, "scores")
    if y.dim() < 1:
        raise ValueError(f"scores must have shape (B,) or (B, N), got {shape_str(y.shape)}")
    batch = y.shape if y.dim() == 1 else y.shape[:-1]
    y, m = _targets(y, mask, batch, name="scores")
    thr = require_finite_float(threshold, "threshold")
    acc = opmath_dtype(y.dtype)
    bad = ((y < thr) & m).any(-1).to(acc)
    return _reduce(bad, m.any(-1), "mean")


def pmr(model_scores: Tensor, ref_scores: Tensor, model_mask: Tensor | None = None,
        ref_mask: Tensor | None = None, *, tie: float = 0.5) -> Tensor:
    r"""Preference matching rate (DFL §4.3: "the percentage of cases where the model's output is
    preferred by human evaluators over outputs from a reference model"), scalar.

    Per item b the evaluators' verdict is read from their scores of the two outputs: the model's
    output is preferred when the mean of its valid scores exceeds the mean for the reference
    output, an exact tie of the two means counts ``tie`` (default ½):
    :math:`\mathrm{PMR} = \frac1{|I|}\sum_{b\in I}\big(1[\bar y^{model}_b > \bar y^{ref}_b] + \text{tie}\cdot 1[\bar y^{model}_b = \bar y^{ref}_b]\big)`,
    I = items where both outputs have at least one valid score. ``model_scores``,
    ``ref_scores``: ``(B,)`` or ``(B, N)`` / ``(B, N')`` (the two panels may differ), masks
    like their scores.
    """
    a = require_floating(model_scores, "model_scores")
    b = require_floating(ref_scores, "ref_scores")
    if a.dim() not in (1, 2):
        raise ValueError(f"model_scores must have shape (B,) or (B, N), got {shape_str(a.shape)}")
    if b.dim() not in (1, 2) or a.shape[0] != b.shape[0]:
        raise ValueError(f"ref_scores must have shape (B,) or (B, N) with B = {a.shape[0]} like model_scores {shape_str(a.shape)}, got {shape_str(b.shape)}")
    tie = require_finite_float(tie, "tie", min_value=0.0)
    if tie > 1:
        raise ValueError(f"tie must lie in [0, 1], got {tie}")
    batch = a.shape[:1]
    ya, ma = _targets(a, model_mask, batch, name="model_scores", mask_name="model_mask")
    yb, mb = _targets(b, ref_mask, batch, name="ref_scores", mask_name="ref_mask")
    require_same_device("model_scores", ya, ref_scores=yb)
    mean_a, _, has_a = _masked_mean(ya, ma)
    mean_b, _, has_b = _masked_mean(yb, mb)
    win = (mean_a > mean_b).to(mean_a.dtype) + tie * (mean_a == mean_b).to(mean_a.dtype)
    return _reduce(win, has_a & has_b, "mean")
