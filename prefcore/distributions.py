r"""Reward distributions and risk measures (DESIGN §4): quantile sets, Gaussian mixtures,
certainty equivalents, mean − α·Var, CVaR/VaR, batched EM fitting of annotator scores and
grid histograms.

Two distribution types, both frozen dataclasses over batched tensors (batch shape ``(...)``):

* :class:`QuantileDistribution` — ``values (..., Q)`` at levels ``taus (Q,)`` (QRM). It is read
  as the law of :math:`\mathcal{Q}(U)`, :math:`U \sim \mathrm{Uniform}(0, 1)`, where
  :math:`\mathcal{Q}` is the **piecewise-linear quantile function** through the knots
  :math:`(\tau_q, v_q)`, extended **linearly** to the levels 0 and 1 with the slope of the first
  and the last segment. That is a continuous distribution with bounded support
  :math:`[\mathcal{Q}(0), \mathcal{Q}(1)]` and a piecewise-constant density (an atom where
  consecutive values are equal; a point mass when ``Q = 1`` or all values are equal).
  Every method (mean, variance, cdf, quantile, sample, CE, CVaR, VaR) is an exact functional of
  that one distribution. Values that cross are sorted first (:func:`non_crossing`), i.e. the
  distribution is defined by the monotone rearrangement.
  Note: :func:`prefcore.ops.exp_utility` is QRM's equal-weight approximation
  (:math:`\frac1Q\sum_q e^{-\lambda v_q}`); :func:`certainty_equivalent` integrates the
  interpolated quantile function exactly instead, so the two differ by the quadrature error.
* :class:`GaussianMixture` — ``logits, mu, log_sigma (..., K)`` (DFL eq. 1–2), weights
  ``softmax(logits)``; every functional is exact (closed form, or bisection to full precision).

All functions are device-agnostic, batch-first and keep no global state. They compute in
float32 (float64 for float64 inputs) and return the dtype of the distribution's parameters.
Bad arguments raise ``ValueError`` (``TypeError`` for a wrong type) naming the argument and the
expected vs. received value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from prefcore.ops._checks import (
    opmath_dtype,
    require_bool,
    require_finite_float,
    require_floating,
    require_same_device,
    shape_str,
)

__all__ = [
    "QuantileDistribution",
    "GaussianMixture",
    "Distribution",
    "certainty_equivalent",
    "mean_variance",
    "cvar",
    "value_at_risk",
    "non_crossing",
    "fit_gmm_em",
    "grid_histogram",
    "grid_probabilities",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_BISECTION_STEPS = 64  # halves the exact bracket 64 times: below the float64 resolution


# ---- small shared helpers -----------------------------------------------------------------


def ndtr(x: Tensor) -> Tensor:
    """Standard normal CDF Φ(x) = erfc(−x/√2)/2, with full relative precision in the lower tail.

    Used instead of ``torch.special.ndtr``, which (torch 2.13, CPU) loses relative precision
    below about −5 and returns 0 from about −8.5 on (Φ(−9) ≈ 1.1e-19 is representable).
    """
    return 0.5 * torch.special.erfc(x * -_SQRT_HALF)


def _check_levels(levels: object, name: str, *, device: torch.device) -> Tensor:
    """A floating tensor of probability levels with at least one dimension, values in [0, 1]."""
    t = require_floating(levels, name)
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape (..., L) with at least 1 dimension, got {shape_str(t.shape)}")
    require_same_device("distribution", torch.empty(0, device=device), **{name: t})
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))][0].item()
        raise ValueError(f"{name} must lie in [0, 1], got {bad}")
    return t


def _check_points(x: object, name: str, *, device: torch.device) -> Tensor:
    t = require_floating(x, name)
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape (..., G) or (G,) with at least 1 dimension, got {shape_str(t.shape)}")
    require_same_device("distribution", torch.empty(0, device=device), **{name: t})
    return t


def _broadcast_last(params: Tensor, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Broadcast ``params (..., P)`` and points ``x (..., G)`` over their leading (batch) dims.

    The last dimension of each is kept: the result is ``params (*lead, P)``, ``x (*lead, G)``
    with ``lead = broadcast(params.shape[:-1], x.shape[:-1])``.
    """
    try:
        lead = torch.broadcast_shapes(tuple(params.shape[:-1]), tuple(x.shape[:-1]))
    except RuntimeError:
        raise ValueError(
            f"{name} must have shape (..., G) whose leading dims broadcast against the batch shape "
            f"{shape_str(params.shape[:-1])}, got {shape_str(x.shape)}"
        ) from None
    return params.expand(*lead, params.shape[-1]), x.expand(*lead, x.shape[-1])


def _lam_tensor(lam: float | Tensor, batch: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(lam, Tensor):
        lam = require_floating(lam, "lam")
        require_same_device("distribution", torch.empty(0, device=device), lam=lam)
        try:
            ok = torch.broadcast_shapes(tuple(lam.shape), tuple(batch)) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"lam must be a float or a tensor broadcastable to the batch shape {shape_str(batch)}, got {shape_str(lam.shape)}")
        if lam.numel() and not bool(torch.isfinite(lam).all()):
            raise ValueError("lam must be finite, got a non-finite entry")
        return lam.to(dtype)
    return torch.tensor(require_finite_float(lam, "lam"), dtype=dtype, device=device)


def _check_alpha(alpha: object) -> float:
    a = require_finite_float(alpha, "alpha")
    if not 0.0 < a <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {a}")
    return a


def _log_exprel_neg(x: Tensor) -> Tensor:
    r""":math:`\log\frac{1 - e^{-x}}{x}` (= 0 at x = 0), stable for all real x.

    The integral of :math:`e^{-\lambda \mathcal{Q}}` over one linear segment of the quantile
    function is :math:`\Delta u\, e^{-\lambda a}\,\frac{1-e^{-\lambda d}}{\lambda d}`; this is the
    log of the last factor. With y = |x|: g(y) = log(−expm1(−y)) − log y, and for x < 0 the
    identity f(x) = −x + f(−x).
    """
    y = x.abs()
    small = y < 1e-3
    y_safe = torch.where(small, torch.ones_like(y), y)
    g = torch.where(small, -0.5 * y + y * y / 24.0, torch.log(-torch.expm1(-y_safe)) - torch.log(y_safe))
    return g + torch.clamp(-x, min=0.0)


def _centered_ce(mean: Tensor, lam: Tensor, log_w: Tensor, w: Tensor, z: Tensor) -> Tensor:
    r"""CE = m − (1/λ)·log Σ_j w_j e^{z_j}, with Σ_j w_j = 1 and z_j the log of the j-th term's
    (centred) exponential moment, so that the log-sum is O(λ²) for small λ.

    Small sums use ``log1p(Σ w·expm1(z))`` (no cancellation against 1); large ones the plain
    log-sum-exp. λ = 0 returns the mean exactly. ``mean`` and ``lam`` are ``(...,)``, ``w, z (..., J)``.
    """
    zmax = z.amax(-1)
    s = (w * torch.expm1(z.clamp(max=30.0))).sum(-1)
    log_small = torch.log1p(s)
    log_large = torch.logsumexp(log_w + z, dim=-1)
    log_m = torch.where(zmax <= 30.0, log_small, log_large)
    lam_safe = torch.where(lam == 0, torch.ones_like(lam), lam)
    return torch.where(lam == 0, mean, mean - log_m / lam_safe)


# ---- quantile sets ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantileDistribution:
    r"""A batch of distributions given by quantile values at fixed levels (QRM).

    Attributes:
        values: ``(..., Q)`` floating, the quantile values :math:`v_q` (should be
            non-decreasing in q; crossing values are sorted, see the module docstring).
        taus: ``(Q,)`` floating, strictly increasing levels strictly inside (0, 1), on the
            device of ``values``.

    The distribution is the law of the piecewise-linear quantile function through
    :math:`(0, v_0^*), (\tau_1, v_1), \dots, (\tau_Q, v_Q), (1, v_{Q+1}^*)` with
    :math:`v_0^* = v_1 - \tau_1 s_1`, :math:`v_{Q+1}^* = v_Q + (1-\tau_Q) s_Q` where
    :math:`s_1, s_Q` are the slopes of the first and last inner segments (0 when Q = 1).
    Construction checks ``taus`` (this reads its values; it is a small (Q,) tensor).
    """

    values: Tensor
    taus: Tensor

    def __post_init__(self) -> None:
        values = require_floating(self.values, "values")
        taus = require_floating(self.taus, "taus")
        if values.dim() < 1 or values.shape[-1] < 1:
            raise ValueError(f"values must have shape (..., Q) with Q >= 1, got {shape_str(values.shape)}")
        q = values.shape[-1]
        if taus.dim() != 1 or taus.shape[0] != q:
            raise ValueError(f"taus must have shape (Q,) = ({q},) to match values {shape_str(values.shape)}, got {shape_str(taus.shape)}")
        require_same_device("values", values, taus=taus)
        t = taus.detach().double().cpu()
        if not bool(((t > 0) & (t < 1)).all()):
            raise ValueError(f"taus must lie strictly inside (0, 1), got min {t.min().item()}, max {t.max().item()}")
        if q > 1 and not bool((t[1:] > t[:-1]).all()):
            raise ValueError(f"taus must be strictly increasing, got {t.tolist()}")

    # -- the piecewise-linear quantile function ------------------------------------------

    @property
    def batch_shape(self) -> torch.Size:
        return self.values.shape[:-1]

    def _acc(self) -> torch.dtype:
        return opmath_dtype(self.values.dtype)

    def _knots(self) -> tuple[Tensor, Tensor]:
        """Levels ``u (Q+2,)`` = [0, τ…, 1] and knot values ``k (..., Q+2)`` (sorted, extended)."""
        acc = self._acc()
        v = torch.sort(self.values.to(acc), dim=-1).values
        t = self.taus.to(acc)
        if v.shape[-1] > 1:
            s_first = (v[..., 1] - v[..., 0]) / (t[1] - t[0])
            s_last = (v[..., -1] - v[..., -2]) / (t[-1] - t[-2])
        else:
            s_first = s_last = torch.zeros_like(v[..., 0])
        k0 = v[..., 0] - t[0] * s_first
        k1 = v[..., -1] + (1 - t[-1]) * s_last
        k = torch.cat([k0.unsqueeze(-1), v, k1.unsqueeze(-1)], dim=-1)
        u = torch.cat([t.new_zeros(1), t, t.new_ones(1)])
        return u, k

    def _out(self, x: Tensor) -> Tensor:
        return x.to(self.values.dtype)

    def mean(self) -> Tensor:
        r"""``(...,)``: :math:`\int_0^1 \mathcal{Q}(u)\,du = \sum_j \Delta u_j (k_j + k_{j+1})/2`."""
        return self._out(self._mean_acc(*self._knots()))

    def _mean_acc(self, u: Tensor, k: Tensor) -> Tensor:
        return ((u[1:] - u[:-1]) * (k[..., 1:] + k[..., :-1])).sum(-1) / 2

    def variance(self) -> Tensor:
        r"""``(...,)``: :math:`\int_0^1 (\mathcal{Q}(u) - m)^2 du = \sum_j \Delta u_j (a_j^2 + a_j b_j + b_j^2)/3`
        with :math:`a_j, b_j` the segment's end values minus the mean (centred: no cancellation)."""
        u, k = self._knots()
        m = self._mean_acc(u, k)
        c = k - m.unsqueeze(-1)
        a, b = c[..., :-1], c[..., 1:]
        return self._out(((u[1:] - u[:-1]) * (a * a + a * b + b * b)).sum(-1) / 3)

    def quantile(self, levels: Tensor) -> Tensor:
        r"""The quantile function :math:`\mathcal{Q}` at ``levels (..., L)`` or ``(L,)`` in [0, 1]
        (leading dims broadcast against the batch shape) → ``(..., L)``. Level 0 and 1 give the
        ends of the support."""
        levels = _check_levels(levels, "levels", device=self.values.device)
        u, k = self._knots()
        return self._out(_interp(levels.to(u.dtype), u, k))

    def cdf(self, x: Tensor) -> Tensor:
        r""":math:`F(x) = \sup\{u : \mathcal{Q}(u) \le x\}` at points ``x (..., G)`` or ``(G,)``
        (leading dims broadcast against the batch shape) → ``(..., G)``; right-continuous (jumps at
        atoms), 0 below the support and 1 from its upper end on."""
        x = _check_points(x, "x", device=self.values.device)
        u, k = self._knots()
        k_b, x_b = _broadcast_last(k, x.to(k.dtype), "x")
        n = k.shape[-1]
        j = torch.searchsorted(k_b.contiguous(), x_b.contiguous(), right=True) - 1  # last knot <= x
        jc = j.clamp(0, n - 2)
        lo_k, hi_k = k_b.gather(-1, jc), k_b.gather(-1, jc + 1)
        lo_u, hi_u = u[jc], u[jc + 1]
        # Inside segment jc we have lo_k <= x < hi_k, so hi_k > lo_k (no division by zero there).
        span = torch.where(hi_k > lo_k, hi_k - lo_k, torch.ones_like(hi_k))
        inner = lo_u + (hi_u - lo_u) * ((x_b - lo_k) / span).clamp(0, 1)
        f = torch.where(j < 0, torch.zeros_like(inner), torch.where(j >= n - 1, torch.ones_like(inner), inner))
        return self._out(f)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws per batch element, ``(..., n)``: :math:`\\mathcal{Q}(U)`, U uniform (inverse
        transform). ``generator`` must live on the device of ``values``."""
        n = _check_count(n, "n")
        acc = self._acc()
        uu = torch.rand(*self.batch_shape, n, generator=generator, dtype=acc, device=self.values.device)
        u, k = self._knots()
        return self._out(_interp(uu, u, k))

    def _integral_below(self, alpha: float) -> Tensor:
        r""":math:`\int_0^\alpha \mathcal{Q}(u)\,du` (acc dtype), by exact trapezoids of the clipped segments."""
        u, k = self._knots()
        lo_u, hi_u = u[:-1], u[1:]
        c = hi_u.clamp(max=alpha)
        width = (c - lo_u).clamp(min=0.0)
        frac = width / (hi_u - lo_u)
        a, b = k[..., :-1], k[..., 1:]
        q_c = a + (b - a) * frac
        return (width * (a + q_c)).sum(-1) / 2


def _interp(levels: Tensor, u: Tensor, k: Tensor) -> Tensor:
    """Piecewise-linear interpolation of knots ``(u (P,), k (..., P))`` at ``levels (..., L)`` in [0, 1]."""
    p = u.shape[0]
    j = (torch.searchsorted(u, levels.contiguous(), right=True) - 1).clamp(0, p - 2)
    k_b, j_b = _broadcast_last(k, j, "levels")
    a, b = k_b.gather(-1, j_b), k_b.gather(-1, j_b + 1)
    lo, hi = u[j_b], u[j_b + 1]
    _, lv = _broadcast_last(k, levels, "levels")
    return a + (b - a) * ((lv - lo) / (hi - lo))


def _check_count(n: object, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return n


def non_crossing(values: Tensor) -> Tensor:
    r"""Monotone (non-crossing) quantiles: ``values (..., Q)`` sorted along the last dim.

    Sorting is the monotone rearrangement of Chernozhukov, Fernández-Val & Galichon (2010) for a
    finite set of levels: it leaves already monotone values unchanged, never increases the
    pinball loss against any target, and is differentiable almost everywhere (a permutation).
    """
    values = require_floating(values, "values")
    if values.dim() < 1:
        raise ValueError(f"values must have shape (..., Q), got {shape_str(values.shape)}")
    return torch.sort(values, dim=-1).values


# ---- Gaussian mixtures --------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianMixture:
    r"""A batch of 1-D Gaussian mixtures (DFL eq. 1–2).

    Attributes (each ``(..., K)``, same dtype and device, K >= 1):
        logits: unnormalised log-weights, :math:`\pi = \mathrm{softmax}(\text{logits})`.
        mu: component means :math:`\mu_k`.
        log_sigma: log standard deviations, :math:`\sigma_k = e^{\text{log\_sigma}_k}`.

    :math:`p(x) = \sum_k \pi_k \mathcal{N}(x \mid \mu_k, \sigma_k^2)`.
    """

    logits: Tensor
    mu: Tensor
    log_sigma: Tensor

    def __post_init__(self) -> None:
        logits = require_floating(self.logits, "logits")
        mu = require_floating(self.mu, "mu")
        log_sigma = require_floating(self.log_sigma, "log_sigma")
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"logits must have shape (..., K) with K >= 1, got {shape_str(logits.shape)}")
        for name, t in (("mu", mu), ("log_sigma", log_sigma)):
            if t.shape != logits.shape:
                raise ValueError(f"{name} must have the shape of logits {shape_str(logits.shape)}, got {shape_str(t.shape)}")
            if t.dtype != logits.dtype:
                raise ValueError(f"{name} must have the dtype of logits ({logits.dtype}), got {t.dtype}")
        require_same_device("logits", logits, mu=mu, log_sigma=log_sigma)

    @property
    def batch_shape(self) -> torch.Size:
        return self.logits.shape[:-1]

    def _params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log π, π, μ, σ) in the accumulation dtype."""
        acc = opmath_dtype(self.logits.dtype)
        log_w = torch.log_softmax(self.logits.to(acc), dim=-1)
        return log_w, log_w.exp(), self.mu.to(acc), self.log_sigma.to(acc).exp()

    def _out(self, x: Tensor) -> Tensor:
        return x.to(self.logits.dtype)

    def weights(self) -> Tensor:
        """``(..., K)`` mixture weights :math:`\\pi = \\mathrm{softmax}(\\text{logits})`."""
        return self._out(self._params()[1])

    def mean(self) -> Tensor:
        r"""``(...,)``: :math:`\sum_k \pi_k \mu_k`."""
        _, w, mu, _ = self._params()
        return self._out((w * mu).sum(-1))

    def variance(self) -> Tensor:
        r"""``(...,)``: :math:`\sum_k \pi_k(\sigma_k^2 + (\mu_k - m)^2)` (law of total variance)."""
        _, w, mu, sigma = self._params()
        m = (w * mu).sum(-1, keepdim=True)
        return self._out((w * (sigma * sigma + (mu - m) ** 2)).sum(-1))

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Log-density at ``x (..., G)`` or ``(G,)`` → ``(..., G)``:
        :math:`\operatorname{logsumexp}_k[\log\pi_k - \log\sigma_k - \tfrac12\log 2\pi - \tfrac12((x-\mu_k)/\sigma_k)^2]`."""
        x = _check_points(x, "x", device=self.logits.device)
        log_w, _, mu, _ = self._params()
        log_s = self.log_sigma.to(mu.dtype)
        p_b, x_b = _broadcast_last(torch.stack([log_w, mu, log_s], -1).flatten(-2), x.to(mu.dtype), "x")
        lw, m, ls = p_b.unflatten(-1, (-1, 3)).unbind(-1)
        z = (x_b.unsqueeze(-1) - m.unsqueeze(-2)) * torch.exp(-ls).unsqueeze(-2)  # (..., G, K)
        return self._out(torch.logsumexp(lw.unsqueeze(-2) - ls.unsqueeze(-2) - _LOG_SQRT_2PI - 0.5 * z * z, dim=-1))

    def _component_grid(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Broadcast (π, μ, σ) ``(*lead, 1, K)`` with points ``x (*lead, G, 1)``."""
        _, w, mu, sigma = self._params()
        p_b, x_b = _broadcast_last(torch.stack([w, mu, sigma], -1).flatten(-2), x.to(mu.dtype), "x")
        w_b, m_b, s_b = p_b.unflatten(-1, (-1, 3)).unbind(-1)
        return w_b.unsqueeze(-2), m_b.unsqueeze(-2), s_b.unsqueeze(-2), x_b.unsqueeze(-1)

    def cdf(self, x: Tensor) -> Tensor:
        r"""CDF at ``x (..., G)`` or ``(G,)`` → ``(..., G)``: :math:`\sum_k \pi_k \Phi((x-\mu_k)/\sigma_k)`."""
        x = _check_points(x, "x", device=self.logits.device)
        w, m, s, xb = self._component_grid(x)
        return self._out((w * ndtr((xb - m) / s)).sum(-1))

    def quantile(self, levels: Tensor) -> Tensor:
        r"""Quantiles at ``levels (..., L)`` or ``(L,)`` in [0, 1] → ``(..., L)``, by batched bisection.

        The mixture's ℓ-quantile lies between the smallest and the largest component ℓ-quantile
        :math:`\mu_k + \sigma_k\Phi^{-1}(\ell)` (at the smallest every component CDF is ≤ ℓ, at the
        largest ≥ ℓ), so that exact bracket is halved 64 times. Levels above 1/2 compare survival
        functions, so upper-tail levels keep full relative precision. Level 0 → −inf, 1 → +inf.
        Differentiable w.r.t. the parameters by the implicit-function theorem,
        :math:`\partial q/\partial\theta = -(\partial F/\partial\theta)(q)/p(q)`.
        """
        levels = _check_levels(levels, "levels", device=self.logits.device)
        acc = opmath_dtype(self.logits.dtype)
        lv = levels.to(acc)
        w_g, m_g, s_g, lvb = self._component_grid(lv)  # (*lead, 1, K), (*lead, L, 1)
        lvb = lvb.squeeze(-1)
        with torch.no_grad():
            w, m, s = w_g.detach(), m_g.detach(), s_g.detach()
            z = torch.special.ndtri(lvb.clamp(min=torch.finfo(acc).tiny, max=1.0)).unsqueeze(-1)
            interior = (lvb > 0) & (lvb < 1)
            zs = torch.where(interior.unsqueeze(-1), z, torch.zeros_like(z))  # finite bracket everywhere
            comp_q = m + s * zs
            lo, hi = comp_q.amin(-1), comp_q.amax(-1)
            upper = lvb > 0.5
            target = torch.where(upper, 1.0 - lvb, lvb)
            for _ in range(_BISECTION_STEPS):
                mid = 0.5 * (lo + hi)
                t = (mid.unsqueeze(-1) - m) / s
                lower_tail = (w * ndtr(t)).sum(-1)
                upper_tail = (w * ndtr(-t)).sum(-1)
                go_right = torch.where(upper, upper_tail > target, lower_tail < target)  # F(mid) < level
                lo = torch.where(go_right, mid, lo)
                hi = torch.where(go_right, hi, mid)
            q = 0.5 * (lo + hi)
        if torch.is_grad_enabled() and (self.logits.requires_grad or self.mu.requires_grad or self.log_sigma.requires_grad):
            # Implicit-function gradient, dq/dθ = −(∂F/∂θ)(q) / p(q): the value stays q exactly
            # (F − F.detach() is 0), and the bisection's branch choices carry no gradient.
            t = (q.unsqueeze(-1) - m_g) / s_g
            f = (w_g * ndtr(t)).sum(-1)
            dens = (w * _INV_SQRT_2PI * torch.exp(-0.5 * t.detach() ** 2) / s).sum(-1).clamp(min=torch.finfo(acc).tiny)
            q = q - (f - f.detach()) / dens
        q = torch.where(lvb <= 0, torch.full_like(q, -math.inf), q)
        q = torch.where(lvb >= 1, torch.full_like(q, math.inf), q)
        return self._out(q)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws per batch element, ``(..., n)``: a component from π, then a normal draw.
        ``generator`` must live on the device of the parameters."""
        n = _check_count(n, "n")
        _, w, mu, sigma = self._params()
        k = w.shape[-1]
        rows = w.reshape(-1, k)
        if rows.shape[0] == 0 or n == 0:
            return self._out(mu.new_empty(*self.batch_shape, n))
        comp = torch.multinomial(rows, n, replacement=True, generator=generator)  # (R, n)
        eps = torch.randn(comp.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        x = mu.reshape(-1, k).gather(-1, comp) + sigma.reshape(-1, k).gather(-1, comp) * eps
        return self._out(x.reshape(*self.batch_shape, n))


Distribution = Union[QuantileDistribution, GaussianMixture]


def _require_dist(dist: object) -> Distribution:
    if not isinstance(dist, (QuantileDistribution, GaussianMixture)):
        raise TypeError(f"dist must be a QuantileDistribution or a GaussianMixture, got {type(dist).__name__}")
    return dist


# ---- risk measures ------------------------------------------------------------------------


def certainty_equivalent(dist: Distribution, lam: float | Tensor) -> Tensor:
    r"""Certainty equivalent of exponential utility, ``(...,)``:
    :math:`CE_\lambda = -\frac1\lambda \log \mathbb{E}[e^{-\lambda r}]`, with :math:`CE_0 = \mathbb{E}[r]`.

    λ > 0 is risk-averse, λ < 0 risk-seeking; ``lam`` is a float or a tensor broadcastable to
    the batch shape. Exact for both types:

    * GaussianMixture: :math:`\log\mathbb{E}[e^{-\lambda r}] = \operatorname{logsumexp}_k(\log\pi_k - \lambda\mu_k + \lambda^2\sigma_k^2/2)`.
    * QuantileDistribution: :math:`\mathbb{E}[e^{-\lambda r}] = \sum_j \Delta u_j e^{-\lambda a_j}\frac{1 - e^{-\lambda d_j}}{\lambda d_j}`
      over the linear segments (start value :math:`a_j`, rise :math:`d_j`) of the quantile function.

    Both are evaluated centred at the mean, so small ``|λ|`` gives mean − λ·Var/2 + … without
    cancellation.
    """
    dist = _require_dist(dist)
    if isinstance(dist, GaussianMixture):
        log_w, w, mu, sigma = dist._params()
        lam_t = _lam_tensor(lam, dist.batch_shape, mu.dtype, mu.device)
        m = (w * mu).sum(-1)
        lam_b = torch.broadcast_to(lam_t, m.shape)
        lam_c = lam_b.unsqueeze(-1)
        z = -lam_c * (mu - m.unsqueeze(-1)) + 0.5 * lam_c * lam_c * sigma * sigma
        return dist._out(_centered_ce(m, lam_b, log_w, w, z))
    u, k = dist._knots()
    lam_t = _lam_tensor(lam, dist.batch_shape, k.dtype, k.device)
    m = dist._mean_acc(u, k)
    lam_b = torch.broadcast_to(lam_t, m.shape)
    lam_c = lam_b.unsqueeze(-1)
    du = u[1:] - u[:-1]
    a = k[..., :-1] - m.unsqueeze(-1)
    d = k[..., 1:] - k[..., :-1]
    z = -lam_c * a + _log_exprel_neg(lam_c * d)
    w = du.expand_as(z)
    return dist._out(_centered_ce(m, lam_b, torch.log(w), w, z))


def mean_variance(dist: Distribution, alpha: float | Tensor) -> Tensor:
    r"""DFL eq. 5 risk-sensitive reward, ``(...,)``: :math:`\mathbb{E}[r] - \alpha\,\mathrm{Var}[r]`.

    α > 0 risk-averse (DFL uses 0.5), α < 0 risk-seeking; a finite float or a tensor
    broadcastable to the batch shape.
    """
    dist = _require_dist(dist)
    if isinstance(alpha, Tensor):
        alpha = require_floating(alpha, "alpha")
    else:
        alpha = require_finite_float(alpha, "alpha")
    return dist.mean() - alpha * dist.variance()


def value_at_risk(dist: Distribution, alpha: float) -> Tensor:
    r"""Value at risk, ``(...,)``: the α-quantile :math:`F^{-1}(\alpha)`, α ∈ (0, 1]
    (a reward, so the lower tail is the risk; α = 1 is the top of the support, +inf for a GMM)."""
    dist = _require_dist(dist)
    a = _check_alpha(alpha)
    dev = dist.values.device if isinstance(dist, QuantileDistribution) else dist.logits.device
    levels = torch.full((1,), a, dtype=opmath_dtype(_param_dtype(dist)), device=dev)
    return dist.quantile(levels).squeeze(-1)


def cvar(dist: Distribution, alpha: float) -> Tensor:
    r"""Conditional value at risk of the lower tail, ``(...,)``:
    :math:`\mathrm{CVaR}_\alpha = \frac1\alpha\int_0^\alpha F^{-1}(u)\,du`, α ∈ (0, 1] (α = 1 → mean).

    * QuantileDistribution: exact trapezoids of the piecewise-linear quantile function.
    * GaussianMixture: with :math:`q = \mathrm{VaR}_\alpha` and :math:`z_k = (q-\mu_k)/\sigma_k`,
      :math:`\frac1\alpha\sum_k \pi_k(\mu_k\Phi(z_k) - \sigma_k\varphi(z_k))`.
    """
    dist = _require_dist(dist)
    a = _check_alpha(alpha)
    if isinstance(dist, QuantileDistribution):
        return dist._out(dist._integral_below(a) / a)
    if a == 1.0:
        return dist.mean()
    _, w, mu, sigma = dist._params()
    q = value_at_risk(dist, a).to(mu.dtype).unsqueeze(-1)
    z = (q - mu) / sigma
    tail = w * (mu * ndtr(z) - sigma * _INV_SQRT_2PI * torch.exp(-0.5 * z * z))
    return dist._out(tail.sum(-1) / a)


# ---- fitting and histograms ---------------------------------------------------------------


def _scores_and_mask(scores: object, mask: object | None) -> tuple[Tensor, Tensor]:
    scores = require_floating(scores, "scores")
    if scores.dim() < 1:
        raise ValueError(f"scores must have shape (B, N), got {shape_str(scores.shape)}")
    if mask is None:
        mask_t = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    else:
        mask_t = require_bool(mask, "mask")
        if mask_t.shape != scores.shape:
            raise ValueError(f"mask must have the shape of scores {shape_str(scores.shape)}, got {shape_str(mask_t.shape)}")
        require_same_device("scores", scores, mask=mask_t)
    return scores, mask_t


def _row_median(x: Tensor, valid: Tensor, n_valid: Tensor) -> Tensor:
    """Median of each row's valid entries (mean of the two middle order statistics) → ``(R,)``."""
    big = torch.finfo(x.dtype).max
    srt = torch.sort(torch.where(valid, x, torch.full_like(x, big)), dim=-1).values
    last = (n_valid.clamp(min=1) - 1).long()
    lo, hi = (last // 2).unsqueeze(-1), ((last + 1) // 2).unsqueeze(-1)
    return 0.5 * (srt.gather(-1, lo) + srt.gather(-1, hi)).squeeze(-1)


def _kmeans_init(x: Tensor, vf: Tensor, cnt: Tensor, k: int, steps: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic start for EM: farthest-point seeding from the row median, then ``steps``
    Lloyd (k-means) iterations. Returns centres ``(R, K)``, cluster counts and within-cluster
    sums of squares (``(R, K)`` each).

    Farthest-point seeding puts one seed in every well-separated cluster whatever the weights
    (quantile-spread seeds can put two seeds in one heavy cluster, a local optimum EM does not
    leave). Invalid entries are never chosen and never assigned.
    """
    valid = vf > 0
    centres = [_row_median(x, valid, cnt)]
    dist = (x - centres[0].unsqueeze(-1)).abs()
    for _ in range(1, k):
        idx = torch.where(valid, dist, torch.full_like(dist, -1.0)).argmax(-1, keepdim=True)
        c = x.gather(-1, idx).squeeze(-1)
        centres.append(c)
        dist = torch.minimum(dist, (x - c.unsqueeze(-1)).abs())
    mu = torch.stack(centres, -1)  # (R, K)
    for _ in range(steps):
        d = (x.unsqueeze(1) - mu.unsqueeze(-1)).abs()  # (R, K, N)
        assign = torch.nn.functional.one_hot(d.argmin(1), k).transpose(1, 2).to(x.dtype) * vf.unsqueeze(1)
        nk = assign.sum(-1)
        sums = (assign @ x.unsqueeze(-1)).squeeze(-1)
        mu = torch.where(nk > 0, sums / nk.clamp(min=1.0), mu)  # an empty cluster keeps its seed
    ss = (assign * (x.unsqueeze(1) - mu.unsqueeze(-1)) ** 2).sum(-1)
    return mu, nk, ss


def fit_gmm_em(
    scores: Tensor,
    mask: Tensor | None,
    k: int,
    iters: int = 100,
    *,
    var_floor: float = 1e-3,
    tol: float = 1e-6,
) -> GaussianMixture:
    r"""Fit a K-component 1-D Gaussian mixture to each row of annotator scores by EM (DFL eq. 1).

    Args:
        scores: ``(B, N)`` (or ``(..., N)``) floating; entries where ``mask`` is False are ignored
            (they may hold anything, NaN included).
        mask: ``(B, N)`` bool (True = valid) or None (all valid). Each row may have its own count.
        k: number of components, >= 1.
        iters: maximum number of EM iterations per row (>= 0).
        var_floor: lower bound on every component variance (squared score units; the default
            suits scores on [−1, 1]: σ >= 0.032). It keeps EM away from the degenerate
            zero-variance maxima that tied or few scores create.
        tol: a row stops once its mean log-likelihood per valid score changed by at most ``tol``
            in one iteration (rows stop independently; 0 → every row runs ``iters``).

    Returns:
        :class:`GaussianMixture` with parameters ``(B, K)`` in the dtype of ``scores``
        (computed in float32, float64 for float64), components sorted by mean.

    Algorithm (deterministic, no random restarts):

    1. Start: farthest-point seeding from the row median, then 10 k-means (Lloyd) steps; the
       clusters give the initial means, variances (floored; the row variance for a cluster
       with fewer than 2 scores) and weights (cluster sizes, at least one score each).
    2. EM: E-step :math:`r_{nk} \propto \pi_k\mathcal{N}(x_n|\mu_k,\sigma_k^2)` over valid n;
       M-step :math:`\pi_k = N_k/N_{valid}`, :math:`\mu_k = \sum_n r_{nk}x_n/N_k`,
       :math:`\sigma_k^2 = \max(\sum_n r_{nk}(x_n-\mu_k)^2/N_k,\ \text{var\_floor})`. A component
       whose responsibility mass vanishes (:math:`N_k` < 1e-8) keeps its mean and variance;
       log-weights are clamped at log(1e-30) so that they stay finite.

    Edge cases (finite output, never NaN): fewer valid scores (or distinct values) than
    components → several components sit on the same scores (tied values give σ² = var_floor);
    a row with **zero** valid scores gets uniform weights, μ = 0 and σ = 1 (a standard normal;
    the caller can tell such rows by ``mask.any(-1)``).
    """
    scores, mask = _scores_and_mask(scores, mask)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    var_floor = require_finite_float(var_floor, "var_floor")
    if var_floor <= 0:
        raise ValueError(f"var_floor must be > 0, got {var_floor}")
    tol = require_finite_float(tol, "tol", min_value=0.0)

    acc = opmath_dtype(scores.dtype)
    lead, n = scores.shape[:-1], scores.shape[-1]
    r = math.prod(lead)
    valid = mask.reshape(r, n)
    x = torch.where(valid, scores.reshape(r, n).to(acc), torch.zeros((), dtype=acc, device=scores.device))
    vf = valid.to(acc)
    n_valid = vf.sum(-1)  # (R,)
    has = n_valid > 0
    cnt = n_valid.clamp(min=1.0)
    row_mean = (x * vf).sum(-1) / cnt
    row_var = (((x - row_mean.unsqueeze(-1)) ** 2) * vf).sum(-1) / cnt

    if n == 0:  # no scores at all: every row is empty (standard normal, see above)
        z = torch.zeros(*lead, k, dtype=scores.dtype, device=scores.device)
        return GaussianMixture(logits=z, mu=z.clone(), log_sigma=z.clone())
    mu, nk0, ss0 = _kmeans_init(x, vf, n_valid, k)
    var = torch.where(nk0 >= 2, ss0 / nk0.clamp(min=1.0), row_var.unsqueeze(-1)).clamp(min=var_floor)
    w0 = nk0.clamp(min=1.0)
    log_w = torch.log(w0 / w0.sum(-1, keepdim=True))

    log_w_floor = math.log(1e-30)
    prev_ll = torch.full_like(n_valid, -math.inf)
    rows = torch.arange(x.shape[0], device=x.device)  # the rows still iterating
    for _ in range(iters):
        if rows.numel() == 0:
            break
        full = rows.numel() == x.shape[0]
        xs, vs, cs = (x, vf, cnt) if full else (x[rows], vf[rows], cnt[rows])
        m_, v_, lw_ = (mu, var, log_w) if full else (mu[rows], var[rows], log_w[rows])
        # E-step in (R, K, N) layout: reductions over N are contiguous.
        inv_s = torch.rsqrt(v_)
        z = (xs.unsqueeze(1) - m_.unsqueeze(-1)) * inv_s.unsqueeze(-1)
        zz = z * z
        lj = (lw_ + 0.5 * torch.log(inv_s * inv_s) - _LOG_SQRT_2PI).unsqueeze(-1) - 0.5 * zz
        top = lj.amax(1, keepdim=True)
        e = torch.exp(lj - top)
        tot = e.sum(1, keepdim=True)
        resp = e * (vs.unsqueeze(1) / tot)
        ll = ((top.squeeze(1) + torch.log(tot.squeeze(1))) * vs).sum(-1) / cs  # at the current parameters
        # M-step. Σ r (x − μ_new)² = σ_old² Σ r z² − N_k (μ_new − μ_old)² (shift identity, reuses z).
        nk = resp.sum(-1)
        alive = nk > 1e-8
        nk_safe = torch.where(alive, nk, torch.ones_like(nk))
        mu_new = torch.where(alive, (resp @ xs.unsqueeze(-1)).squeeze(-1) / nk_safe, m_)
        shift = mu_new - m_
        var_new = (resp * zz).sum(-1) * v_ / nk_safe - shift * shift
        var_new = torch.where(alive, var_new, v_).clamp(min=var_floor)
        lw_new = torch.log(nk / cs.unsqueeze(-1)).clamp(min=log_w_floor)
        if full:
            mu, var, log_w = mu_new, var_new, lw_new
        else:
            mu, var, log_w = mu.index_copy(0, rows, mu_new), var.index_copy(0, rows, var_new), log_w.index_copy(0, rows, lw_new)
        if tol > 0:
            done = (ll - prev_ll[rows]).abs() <= tol
            prev_ll = prev_ll.index_copy(0, rows, ll)
            rows = rows[~done]

    empty = ~has.unsqueeze(-1)
    mu = torch.where(empty, torch.zeros_like(mu), mu)
    log_sigma = torch.where(empty, torch.zeros_like(var), 0.5 * torch.log(var))
    log_w = torch.where(empty, torch.zeros_like(log_w), log_w)
    order = torch.argsort(mu, dim=-1, stable=True)
    log_w, mu, log_sigma = (t.gather(-1, order) for t in (log_w, mu, log_sigma))
    out = scores.dtype
    return GaussianMixture(
        logits=log_w.reshape(*lead, k).to(out),
        mu=mu.reshape(*lead, k).to(out),
        log_sigma=log_sigma.reshape(*lead, k).to(out),
    )


def grid_histogram(scores: Tensor, mask: Tensor | None, grid: Tensor, bandwidth: float) -> Tensor:
    r"""Gaussian kernel density estimate of each row's valid scores, evaluated on ``grid`` and
    normalised over the grid: ``(B, G)`` (or ``(..., G)``), rows sum to 1.

    :math:`h_{bg} = \frac{\sum_n m_{bn}\exp(-\tfrac12((g - x_{bn})/h)^2)}{\sum_{g'}\sum_n m_{bn}\exp(-\tfrac12((g' - x_{bn})/h)^2)}`
    with ``h = bandwidth`` — DFL eq. 3's target histogram on a fixed grid of reward values.
    Computed in log space (logsumexp over scores, softmax over the grid), so a score far from
    every grid point, or a tiny bandwidth, still gives a normalised row (its mass goes to the
    nearest grid points) instead of 0/0. A row with **no valid score** is uniform (1/G).

    Args: ``scores (B, N)`` floating; ``mask (B, N)`` bool or None; ``grid (G,)`` floating,
    G >= 1 (any order); ``bandwidth`` > 0. Output dtype: that of ``scores``. Rows are processed
    in chunks, so the temporary kernel matrix stays near 2^22 elements whatever B is.
    """
    scores, mask = _scores_and_mask(scores, mask)
    grid = require_floating(grid, "grid")
    if grid.dim() != 1 or grid.shape[0] < 1:
        raise ValueError(f"grid must have shape (G,) with G >= 1, got {shape_str(grid.shape)}")
    require_same_device("scores", scores, grid=grid)
    h = require_finite_float(bandwidth, "bandwidth")
    if h <= 0:
        raise ValueError(f"bandwidth must be > 0, got {h}")
    acc = opmath_dtype(scores.dtype)
    lead, n, gsize = scores.shape[:-1], scores.shape[-1], grid.shape[0]
    rows = math.prod(lead)
    x = torch.where(mask, scores.to(acc), torch.zeros((), dtype=acc, device=scores.device)).reshape(rows, n)
    m = mask.reshape(rows, n)
    g = grid.to(acc)
    out = torch.empty(rows, gsize, dtype=acc, device=scores.device)
    # Rows in chunks so the (rows, G, N) kernel matrix stays near 2^22 elements (16 MiB in fp32).
    step = max(1, (1 << 22) // max(1, gsize * n))
    for r0 in range(0, rows, step):
        xs, ms = x[r0:r0 + step], m[r0:r0 + step]
        z = (g.unsqueeze(-1) - xs.unsqueeze(-2)) / h  # (r, G, N)
        log_k = torch.where(ms.unsqueeze(-2), -0.5 * z * z, torch.full_like(z, -math.inf))
        log_dens = torch.logsumexp(log_k, dim=-1)  # (r, G); -inf everywhere for an empty row
        log_dens = torch.where(ms.any(-1, keepdim=True), log_dens, torch.zeros_like(log_dens))
        out[r0:r0 + step] = torch.softmax(log_dens, dim=-1)
    return out.reshape(*lead, gsize).to(scores.dtype)


def grid_probabilities(dist: Distribution, grid: Tensor) -> Tensor:
    r"""Discretise ``dist`` onto a strictly increasing ``grid (G,)``: ``(..., G)`` cell masses
    that sum to 1.

    Cell g is :math:`[e_{g-1}, e_g)` with edges at the midpoints :math:`e_g = (x_g + x_{g+1})/2`,
    :math:`e_0 = -\infty`, :math:`e_G = +\infty`, so mass outside the grid lands on the end cells:
    :math:`p_g = F(e_g) - F(e_{g-1})`. Used to compare a predicted distribution with a target
    histogram on the same grid (:func:`prefcore.eval.das`).
    """
    dist = _require_dist(dist)
    grid = require_floating(grid, "grid")
    if grid.dim() != 1 or grid.shape[0] < 1:
        raise ValueError(f"grid must have shape (G,) with G >= 1, got {shape_str(grid.shape)}")
    dev = dist.values.device if isinstance(dist, QuantileDistribution) else dist.logits.device
    require_same_device("distribution", torch.empty(0, device=dev), grid=grid)
    if grid.shape[0] > 1 and not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("grid must be strictly increasing")
    batch = dist.batch_shape
    if grid.shape[0] == 1:
        return torch.ones(*batch, 1, dtype=_param_dtype(dist), device=dev)
    acc = opmath_dtype(_param_dtype(dist))
    g = grid.to(acc)
    edges = 0.5 * (g[1:] + g[:-1])
    f = dist.cdf(edges).to(acc)  # (..., G-1)
    zeros = torch.zeros(*f.shape[:-1], 1, dtype=acc, device=dev)
    ones = torch.ones_like(zeros)
    cdf = torch.cat([zeros, f, ones], dim=-1)
    return (cdf[..., 1:] - cdf[..., :-1]).clamp(min=0.0).to(_param_dtype(dist))


def _param_dtype(dist: Distribution) -> torch.dtype:
    return dist.values.dtype if isinstance(dist, QuantileDistribution) else dist.logits.dtype

