"""prefcore.distributions against scipy, closed forms, numerical integration and fp64 brute force.

Quantile sets are checked against an independent numpy construction of the documented
distribution (piecewise-linear quantile function through (τ_q, v_q), extended linearly to the
levels 0 and 1) integrated with scipy.integrate.quad; Gaussian mixtures against scipy.stats.norm,
scipy.optimize.brentq and quad. Tolerances (float64): closed forms 1e-12, quadrature 1e-9 (rel),
bisection 1e-12 in level. EM recovery tolerances are stated in its test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

import prefcore  # noqa: F401
from prefcore.distributions import (
    GaussianMixture,
    QuantileDistribution,
    certainty_equivalent,
    cvar,
    fit_gmm_em,
    grid_histogram,
    grid_probabilities,
    mean_variance,
    non_crossing,
    value_at_risk,
)
from prefcore.ops import exp_utility, reference
from python_tests.helpers import DEVICES

F64 = torch.float64
TAUS19 = torch.linspace(0.05, 0.95, 19, dtype=F64)


# ---- independent references ---------------------------------------------------------------


def np_knots(values: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented quantile function of one row: knots (levels, values), tails extended linearly."""
    v = np.sort(values)
    if len(v) > 1:
        s0 = (v[1] - v[0]) / (taus[1] - taus[0])
        s1 = (v[-1] - v[-2]) / (taus[-1] - taus[-2])
    else:
        s0 = s1 = 0.0
    u = np.concatenate([[0.0], taus, [1.0]])
    k = np.concatenate([[v[0] - taus[0] * s0], v, [v[-1] + (1 - taus[-1]) * s1]])
    return u, k


def expm1_plus(t: float) -> float:
    """e^{−t} − 1 + t ≥ 0 without cancellation (series for small t)."""
    if abs(t) < 1e-3:
        return t * t / 2 - t**3 / 6 + t**4 / 24
    return math.expm1(-t) + t


def np_qf(values, taus):
    u, k = np_knots(values, taus)
    return lambda p: np.interp(p, u, k), u


def quad_u(f, breaks, lo=0.0, hi=1.0, epsabs=1e-13):
    pts = [b for b in breaks if lo < b < hi]
    return integrate.quad(f, lo, hi, points=pts or None, limit=200, epsabs=epsabs, epsrel=1e-12)[0]


def gmm_np(d: GaussianMixture, row: int):
    w = torch.softmax(d.logits.double(), -1)[row].numpy()
    return w, d.mu.double()[row].numpy(), d.log_sigma.double().exp()[row].numpy()


def mix_cdf(w, mu, s, x):
    return float(np.sum(w * stats.norm.cdf(x, mu, s)))


def random_gmm(batch, k, dtype=F64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(
        torch.randn(*batch, k, generator=g, dtype=F64).to(device=device, dtype=dtype),
        torch.randn(*batch, k, generator=g, dtype=F64).to(device=device, dtype=dtype),
        (0.4 * torch.randn(*batch, k, generator=g, dtype=F64) - 0.3).to(device=device, dtype=dtype),
    )


def random_qset(batch, taus=TAUS19, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(*batch, taus.shape[0], generator=g, dtype=F64).to(device)
    return QuantileDistribution(v, taus.to(device))


# ---- Gaussian mixtures --------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_gmm_moments_density_cdf_match_scipy(k):
    d = random_gmm((2, 3), k)
    x_shared = torch.linspace(-4, 4, 17, dtype=F64)
    x_rows = torch.randn(2, 3, 5, dtype=F64) * 2
    mean, var = d.mean(), d.variance()
    lp_shared, cdf_shared = d.log_prob(x_shared), d.cdf(x_shared)
    lp_rows, cdf_rows = d.log_prob(x_rows), d.cdf(x_rows)
    assert lp_shared.shape == (2, 3, 17) and lp_rows.shape == (2, 3, 5) and mean.shape == (2, 3)
    flat = GaussianMixture(d.logits.reshape(6, k), d.mu.reshape(6, k), d.log_sigma.reshape(6, k))
    for r in range(6):
        i, j = divmod(r, 3)
        w, mu, s = gmm_np(flat, r)
        m = np.sum(w * mu)
        assert mean[i, j].item() == pytest.approx(m, rel=1e-12, abs=1e-12)
        assert var[i, j].item() == pytest.approx(np.sum(w * (s**2 + mu**2)) - m**2, rel=1e-11)
        for xs, lp, cd in ((x_shared.numpy(), lp_shared[i, j], cdf_shared[i, j]), (x_rows[i, j].numpy(), lp_rows[i, j], cdf_rows[i, j])):
            pdf = np.array([np.sum(w * stats.norm.pdf(x, mu, s)) for x in xs])
            np.testing.assert_allclose(lp.numpy(), np.log(pdf), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(cd.numpy(), [mix_cdf(w, mu, s, x) for x in xs], rtol=1e-12, atol=1e-14)


def test_gmm_log_prob_far_points_and_tiny_sigma_are_finite():
    d = GaussianMixture(torch.zeros(1, 2, dtype=F64), torch.tensor([[0.0, 1.0]], dtype=F64),
                        torch.tensor([[-20.0, 0.0]], dtype=F64))
    lp = d.log_prob(torch.tensor([0.5, 1e3], dtype=F64))
    assert torch.isfinite(lp).all()
    # far away, only the wide component matters: log(½ N(1e3 | 1, 1))
    assert lp[0, 1].item() == pytest.approx(math.log(0.5) + stats.norm.logpdf(1e3, 1.0, 1.0), rel=1e-12)


def test_gmm_quantile_bisection_matches_brentq_and_inverts_cdf():
    d = random_gmm((4,), 3, seed=1)
    levels = torch.tensor([1e-12, 1e-4, 0.05, 0.3, 0.5, 0.77, 0.95, 1 - 1e-4, 1 - 1e-12], dtype=F64)
    q = d.quantile(levels)
    assert q.shape == (4, 9)
    for r in range(4):
        w, mu, s = gmm_np(d, r)
        for j, lv in enumerate(levels.tolist()):
            if lv > 0.5:  # survival function for the upper tail (scipy's cdf rounds to 1 there)
                f = lambda x: float(np.sum(w * stats.norm.sf(x, mu, s))) - (1 - lv)  # noqa: E731
            else:
                f = lambda x: mix_cdf(w, mu, s, x) - lv  # noqa: E731
            root = optimize.brentq(f, -60, 60, xtol=1e-14, rtol=1e-14)
            assert q[r, j].item() == pytest.approx(root, abs=1e-9), (r, lv)
    # per-row levels (B, L) and the ends of [0, 1]
    ends = d.quantile(torch.tensor([[0.0, 1.0]] * 4, dtype=F64))
    assert torch.isneginf(ends[:, 0]).all() and torch.isposinf(ends[:, 1]).all()
    inner = torch.rand(4, 6, dtype=F64) * 0.98 + 0.01
    torch.testing.assert_close(d.cdf(d.quantile(inner)), inner, rtol=0, atol=1e-13)


def test_gmm_quantile_float32_is_accurate():
    d64 = random_gmm((5,), 3, seed=2)
    d32 = GaussianMixture(d64.logits.float(), d64.mu.float(), d64.log_sigma.float())
    levels = torch.tensor([0.01, 0.25, 0.5, 0.9, 0.999])
    q32 = d32.quantile(levels)
    assert q32.dtype == torch.float32
    q64 = GaussianMixture(d32.logits.double(), d32.mu.double(), d32.log_sigma.double()).quantile(levels.double())
    torch.testing.assert_close(q32.double(), q64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [-2.0, -0.3, 1e-7, 0.5, 3.0])
def test_gmm_certainty_equivalent_matches_numerical_integration(lam):
    d = random_gmm((3,), 3, seed=3)
    ce = certainty_equivalent(d, lam)
    for r in range(3):
        w, mu, s = gmm_np(d, r)
        c = float(np.sum(w * mu))
        lo, hi = (mu - 40 * s).min(), (mu + 40 * s).max()
        dens = lambda x: float(np.sum(w * stats.norm.pdf(x, mu, s)))  # noqa: E731
        # E[e^{-λ(X-c)}] − 1 = E[e^{-λ(X-c)} − 1 + λ(X-c)] (c is the mean): a non-negative
        # integrand, so tiny λ keeps its digits
        mgf_m1 = integrate.quad(lambda x: expm1_plus(lam * (x - c)) * dens(x), lo, hi, points=list(mu), limit=400,
                                epsabs=0, epsrel=1e-11)[0]
        assert ce[r].item() == pytest.approx(c - math.log1p(mgf_m1) / lam, rel=1e-9, abs=1e-12)


def test_gmm_certainty_equivalent_limits_and_tensor_lam():
    d = random_gmm((4,), 3, seed=4)
    m, v = d.mean(), d.variance()
    assert torch.equal(certainty_equivalent(d, 0.0), m)
    # small λ: CE = m − λ·Var/2 + O(λ²) with no cancellation
    lam = 1e-6
    torch.testing.assert_close(certainty_equivalent(d, lam), m - lam * v / 2, rtol=0, atol=1e-11)
    # one component: CE = μ − λσ²/2 exactly, for any λ (large λ does not overflow)
    n = GaussianMixture(torch.zeros(2, 1, dtype=F64), torch.tensor([[0.3], [-1.0]], dtype=F64),
                        torch.tensor([[math.log(0.7)], [0.0]], dtype=F64))
    for lam in (-50.0, 1e-9, 2.0, 400.0):
        torch.testing.assert_close(certainty_equivalent(n, lam), n.mu[:, 0] - lam * n.log_sigma[:, 0].exp() ** 2 / 2,
                                   rtol=1e-12, atol=1e-12)
    lam_t = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=F64)
    per_row = certainty_equivalent(d, lam_t)
    for i in range(4):
        torch.testing.assert_close(per_row[i], certainty_equivalent(d, lam_t[i].item())[i])


def test_gmm_sample_matches_distribution():
    d = GaussianMixture(torch.tensor([[0.0, 1.0, -0.5]], dtype=F64), torch.tensor([[-0.6, 0.1, 0.7]], dtype=F64),
                        torch.tensor([[-2.0, -1.5, -2.5]], dtype=F64))
    n = 100_000
    x = d.sample(n, torch.Generator().manual_seed(7))
    assert x.shape == (1, n) and x.dtype == F64
    assert torch.equal(x, d.sample(n, torch.Generator().manual_seed(7)))  # reproducible
    w, mu, s = gmm_np(d, 0)
    res = stats.kstest(x[0].numpy(), lambda t: np.sum(w[:, None] * stats.norm.cdf(t[None], mu[:, None], s[:, None]), 0))
    assert res.pvalue > 1e-3
    se = math.sqrt(d.variance().item() / n)
    assert abs(x.mean().item() - d.mean().item()) < 5 * se
    assert d.sample(0).shape == (1, 0)
    assert GaussianMixture(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2)).sample(3).shape == (0, 3)


def test_risk_measures_on_a_normal_match_closed_forms():
    mu, sigma = 0.3, 0.7
    d = GaussianMixture(torch.zeros(1, 1, dtype=F64), torch.full((1, 1), mu, dtype=F64), torch.full((1, 1), math.log(sigma), dtype=F64))
    for alpha in (0.01, 0.05, 0.25, 0.5, 0.9):
        z = stats.norm.ppf(alpha)
        assert value_at_risk(d, alpha).item() == pytest.approx(mu + sigma * z, abs=1e-12)
        assert cvar(d, alpha).item() == pytest.approx(mu - sigma * stats.norm.pdf(z) / alpha, rel=1e-11)
    assert cvar(d, 1.0).item() == pytest.approx(mu, abs=1e-15)
    assert math.isinf(value_at_risk(d, 1.0).item())
    assert mean_variance(d, 0.5).item() == pytest.approx(mu - 0.5 * sigma**2, abs=1e-15)


def test_gmm_cvar_matches_integral_of_quantile_function():
    d = random_gmm((3,), 3, seed=5)
    for alpha in (0.05, 0.3):
        got = cvar(d, alpha)
        for r in range(3):
            w, mu, s = gmm_np(d, r)
            q = value_at_risk(d, alpha)[r].item()
            tail = integrate.quad(lambda x: x * np.sum(w * stats.norm.pdf(x, mu, s)), (mu - 40 * s).min(), q,
                                  limit=400, epsabs=1e-13, epsrel=1e-12)[0]
            assert got[r].item() == pytest.approx(tail / alpha, rel=1e-9)


# ---- quantile sets ------------------------------------------------------------------------


def test_quantile_set_moments_ce_cvar_match_quadrature_of_the_documented_quantile_function():
    taus = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.55, 0.8, 0.97], dtype=F64)  # uneven levels
    d = random_qset((5,), taus, seed=6)
    m, v = d.mean(), d.variance()
    ce = {lam: certainty_equivalent(d, lam) for lam in (-3.0, -0.2, 1e-8, 0.7, 4.0)}
    cv = {a: cvar(d, a) for a in (0.02, 0.05, 0.4, 1.0)}
    for r in range(5):
        qf, u = np_qf(d.values[r].numpy(), taus.numpy())
        mean = quad_u(qf, u)
        assert m[r].item() == pytest.approx(mean, rel=1e-10, abs=1e-12)
        assert v[r].item() == pytest.approx(quad_u(lambda p: (qf(p) - mean) ** 2, u), rel=1e-10)
        for lam, got in ce.items():
            mgf_m1 = quad_u(lambda p: expm1_plus(lam * (qf(p) - mean)), u, epsabs=0.0)
            assert got[r].item() == pytest.approx(mean - math.log1p(mgf_m1) / lam, rel=1e-9, abs=1e-12), lam
        for a, got in cv.items():
            assert got[r].item() == pytest.approx(quad_u(qf, u, 0.0, a) / a, rel=1e-10, abs=1e-12), a
    assert torch.equal(certainty_equivalent(d, 0.0), m)
    torch.testing.assert_close(mean_variance(d, 0.5), m - 0.5 * v)
    torch.testing.assert_close(mean_variance(d, -1.0), m + v)


def test_quantile_set_cdf_quantile_are_the_documented_interpolation():
    d = random_qset((3, 2), seed=8)
    x = torch.linspace(-5, 5, 41, dtype=F64)
    cdf = d.cdf(x)
    levels = torch.tensor([0.0, 0.01, 0.05, 0.33, 0.5, 0.951, 1.0], dtype=F64)
    q = d.quantile(levels)
    assert cdf.shape == (3, 2, 41) and q.shape == (3, 2, 7)
    for i in range(3):
        for j in range(2):
            u, k = np_knots(d.values[i, j].numpy(), TAUS19.numpy())
            np.testing.assert_allclose(cdf[i, j].numpy(), np.interp(x.numpy(), k, u, left=0.0, right=1.0), atol=1e-14)
            np.testing.assert_allclose(q[i, j].numpy(), np.interp(levels.numpy(), u, k), atol=1e-14)
    # at the levels themselves the quantile function returns the values, and cdf inverts it
    srt = torch.sort(d.values, -1).values
    torch.testing.assert_close(d.quantile(TAUS19), srt, rtol=0, atol=1e-14)
    torch.testing.assert_close(d.cdf(srt), TAUS19.expand_as(srt), rtol=0, atol=1e-14)
    # per-row points broadcast against the batch: (2, G) against batch (3, 2)
    torch.testing.assert_close(d.cdf(x[:5].expand(2, 5)), cdf[..., :5])


def test_uniform_quantile_set_is_exactly_uniform():
    a, b = -0.4, 0.9
    d = QuantileDistribution((a + (b - a) * TAUS19)[None], TAUS19)
    assert d.mean().item() == pytest.approx((a + b) / 2, abs=1e-15)
    assert d.variance().item() == pytest.approx((b - a) ** 2 / 12, rel=1e-13)
    for lam in (-5.0, 0.3, 2.0):
        closed = -math.log((math.exp(-lam * a) - math.exp(-lam * b)) / (lam * (b - a))) / lam
        assert certainty_equivalent(d, lam).item() == pytest.approx(closed, rel=1e-13)
    for alpha in (0.01, 0.2, 0.75):
        assert cvar(d, alpha).item() == pytest.approx(a + (b - a) * alpha / 2, rel=1e-13)
        assert value_at_risk(d, alpha).item() == pytest.approx(a + (b - a) * alpha, rel=1e-13)
    xs = torch.tensor([a - 1, a, 0.0, b, b + 1], dtype=F64)
    torch.testing.assert_close(d.cdf(xs)[0], torch.tensor([0.0, 0.0, -a / (b - a), 1.0, 1.0], dtype=F64))
    s = d.sample(20_000, torch.Generator().manual_seed(3))
    assert s.shape == (1, 20_000)
    assert stats.kstest(s[0].numpy(), stats.uniform(a, b - a).cdf).pvalue > 1e-3


def test_quantile_set_point_mass_and_crossing_values():
    one = QuantileDistribution(torch.tensor([[0.25], [-1.0]], dtype=F64), torch.tensor([0.5], dtype=F64))
    torch.testing.assert_close(one.mean(), torch.tensor([0.25, -1.0], dtype=F64))
    assert torch.equal(one.variance(), torch.zeros(2, dtype=F64))
    for lam in (-3.0, 0.0, 5.0):
        torch.testing.assert_close(certainty_equivalent(one, lam), one.values[:, 0])
    torch.testing.assert_close(cvar(one, 0.1), one.values[:, 0])
    torch.testing.assert_close(one.cdf(torch.tensor([0.2, 0.25, 0.3], dtype=F64)),
                               torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64))
    # equal values inside a set: an atom; the CDF jumps over the flat part of the quantile function
    taus = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=F64)
    flat = QuantileDistribution(torch.tensor([[0.0, 1.0, 1.0, 2.0]], dtype=F64), taus)
    torch.testing.assert_close(flat.cdf(torch.tensor([0.999, 1.0], dtype=F64)), torch.tensor([[0.4 - 0.2 * 0.001, 0.6]], dtype=F64))
    # crossing values define the same distribution as their monotone rearrangement
    v = torch.randn(4, 19, dtype=F64)
    a, b = QuantileDistribution(v, TAUS19), QuantileDistribution(non_crossing(v), TAUS19)
    for f in (lambda d: d.mean(), lambda d: d.variance(), lambda d: certainty_equivalent(d, 1.5), lambda d: cvar(d, 0.1),
              lambda d: d.cdf(torch.linspace(-2, 2, 9, dtype=F64))):
        torch.testing.assert_close(f(a), f(b))


def test_quantile_set_from_a_normal_approaches_the_normal():
    # 999 levels of N(0.3, 0.7²): the interpolated quantile function converges to the normal's.
    taus = torch.arange(1, 1000, dtype=F64) / 1000
    vals = torch.from_numpy(stats.norm.ppf(taus.numpy(), 0.3, 0.7))[None]
    d = QuantileDistribution(vals, taus)
    assert d.mean().item() == pytest.approx(0.3, abs=1e-4)
    assert d.variance().item() == pytest.approx(0.49, rel=2e-2)  # the cut tails lose a little variance
    z = stats.norm.ppf(0.1)
    assert cvar(d, 0.1).item() == pytest.approx(0.3 - 0.7 * stats.norm.pdf(z) / 0.1, abs=5e-3)
    assert value_at_risk(d, 0.1).item() == pytest.approx(0.3 + 0.7 * z, abs=1e-12)
    # CE_1 of the normal is μ − σ²/2; QRM's equal-weight rule (prefcore.ops.exp_utility) on the
    # same levels gets near it too, but ignores the tails beyond the outer levels (less accurate).
    ce = certainty_equivalent(d, 1.0).item()
    assert ce == pytest.approx(0.3 - 0.49 / 2, abs=2e-3)
    assert ce == pytest.approx(exp_utility(vals, 1.0).item(), abs=5e-3)


def test_quantile_set_float32_and_bfloat16():
    d64 = random_qset((6,), seed=9)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        d = QuantileDistribution(d64.values.to(dtype), TAUS19.to(dtype))
        ref = QuantileDistribution(d.values.double(), d.taus.double())
        for f in (lambda q: q.mean(), lambda q: q.variance(), lambda q: certainty_equivalent(q, 0.8),
                  lambda q: cvar(q, 0.05), lambda q: q.cdf(torch.linspace(-1, 1, 5, dtype=q.values.dtype))):
            out = f(d)
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), f(ref), rtol=tol, atol=tol)


def test_non_crossing_sorts_and_never_increases_the_pinball_loss():
    v = torch.randn(50, 19, dtype=F64)
    nc = non_crossing(v)
    assert (nc[:, 1:] >= nc[:, :-1]).all()
    assert torch.equal(non_crossing(nc), nc)
    assert torch.equal(torch.sort(v, -1).values, nc)
    y = torch.randn(50, 9, dtype=F64)
    before = reference.pinball_loss(v, y, TAUS19, reduction="none")
    after = reference.pinball_loss(nc, y, TAUS19, reduction="none")
    assert (after <= before + 1e-12).all() and (after < before - 1e-6).any()


# ---- EM -----------------------------------------------------------------------------------


def _mixture_scores(b, n, mu, sig, w, g):
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    x = mu.gather(-1, comp) + sig.gather(-1, comp) * torch.randn(b, n, generator=g, dtype=F64)
    return x, comp


def test_fit_gmm_em_recovers_known_mixtures():
    """2000 items × 300 scores, K = 3, means −0.6/0/0.6 (±0.05), σ ∈ [0.04, 0.08], weights ≥ 0.12.

    With components ≥ 7σ apart the MLE is, up to rare overlaps, the per-component sample
    statistics with the true labels (the "oracle"). EM (float32) must match that oracle within
    0.01 in every weight and mean and 0.015 in every σ for every item, and so lie within sampling
    error of the truth: 99th percentile of |error| below 0.1 (weights), 0.03 (means), 0.02 (σ).
    """
    g = torch.Generator().manual_seed(11)
    b, n, k = 2000, 300, 3
    mu = torch.tensor([-0.6, 0.0, 0.6], dtype=F64) + 0.1 * (torch.rand(b, k, generator=g, dtype=F64) - 0.5)
    sig = 0.04 + 0.04 * torch.rand(b, k, generator=g, dtype=F64)
    w = 0.2 + torch.rand(b, k, generator=g, dtype=F64)
    w = w / w.sum(-1, keepdim=True)
    x, comp = _mixture_scores(b, n, mu, sig, w, g)
    fit = fit_gmm_em(x.float(), None, k)
    assert fit.mu.shape == (b, k) and fit.mu.dtype == torch.float32
    onehot = torch.nn.functional.one_hot(comp, k).double()
    nk = onehot.sum(1)
    o_mu = (onehot * x[..., None]).sum(1) / nk
    o_sig = ((onehot * (x[..., None] - o_mu[:, None]) ** 2).sum(1) / nk).sqrt()
    e_w, e_mu, e_sig = torch.softmax(fit.logits.double(), -1), fit.mu.double(), fit.log_sigma.double().exp()
    assert (e_w - nk / n).abs().max() < 0.01
    assert (e_mu - o_mu).abs().max() < 0.01
    assert (e_sig - o_sig).abs().max() < 0.015
    assert (e_w - w).abs().flatten().quantile(0.99) < 0.1
    assert (e_mu - mu).abs().flatten().quantile(0.99) < 0.03
    assert (e_sig - sig).abs().flatten().quantile(0.99) < 0.02


def test_fit_gmm_em_beats_the_true_parameters_on_overlapping_mixtures():
    # EM maximises the likelihood: on each item its fit should be at least as likely as the
    # parameters that generated the data (overlapping components, DFL-sized panels of 10 scores
    # and larger ones). Allow 2% of items to land in a worse local optimum.
    g = torch.Generator().manual_seed(12)
    for n in (10, 60):
        b, k = 300, 3
        mu = torch.tensor([-0.5, 0.0, 0.5], dtype=F64) + 0.2 * (torch.rand(b, k, generator=g, dtype=F64) - 0.5)
        sig = 0.1 + 0.15 * torch.rand(b, k, generator=g, dtype=F64)
        w = torch.softmax(torch.randn(b, k, generator=g, dtype=F64), -1)
        x, _ = _mixture_scores(b, n, mu, sig, w, g)
        fit = fit_gmm_em(x, None, k, var_floor=1e-4)  # default iters and tol
        truth = GaussianMixture(w.log(), mu, sig.log())
        ll_fit = fit.log_prob(x).sum(-1)
        ll_true = truth.log_prob(x).sum(-1)
        assert torch.isfinite(ll_fit).all()
        assert (ll_fit >= ll_true - 1e-6).double().mean() >= 0.98, n


def test_fit_gmm_em_single_component_is_the_closed_form_mle():
    x = torch.randn(7, 12, dtype=F64) * 0.3 + 0.2
    mask = torch.rand(7, 12) > 0.3
    mask[:, 0] = True
    mask[3] = False
    mask[3, :2] = True
    fit = fit_gmm_em(x, mask, 1, iters=3)
    for r in range(7):
        v = x[r][mask[r]].numpy()
        assert fit.mu[r, 0].item() == pytest.approx(v.mean(), rel=1e-12)
        assert fit.log_sigma[r, 0].exp().item() ** 2 == pytest.approx(max(v.var(), 1e-3), rel=1e-10)
        assert fit.logits[r, 0].item() == pytest.approx(0.0, abs=1e-12)


def test_fit_gmm_em_padded_batch_equals_per_item_fits():
    # Ragged panels (7–10 annotators, DFL) padded with NaN: every row's fit equals the fit of its
    # valid scores alone, so masking and batching change nothing.
    g = torch.Generator().manual_seed(13)
    b, n = 24, 10
    x = torch.rand(b, n, generator=g, dtype=F64) * 2 - 1
    counts = torch.randint(7, 11, (b,), generator=g)
    mask = torch.arange(n)[None] < counts[:, None]
    perm = torch.argsort(torch.rand(b, n, generator=g), -1)  # scatter the valid entries
    mask = mask.gather(-1, perm)
    xp = torch.where(mask, x, torch.full_like(x, float("nan")))
    fit = fit_gmm_em(xp, mask, 3)
    for r in range(b):
        alone = fit_gmm_em(x[r][mask[r]][None], None, 3)
        for a, c in ((fit.logits, alone.logits), (fit.mu, alone.mu), (fit.log_sigma, alone.log_sigma)):
            torch.testing.assert_close(a[r], c[0], rtol=1e-10, atol=1e-10)


def test_fit_gmm_em_few_zero_and_equal_scores_give_finite_output():
    x = torch.tensor([[0.5, 0.0, 0.0, 0.0],    # one valid score
                      [0.2, -0.3, 0.0, 0.0],   # two valid scores, K = 3
                      [0.0, 0.0, 0.0, 0.0],    # no valid score
                      [0.4, 0.4, 0.4, 0.4],    # all equal
                      [1.0, 1.0, -1.0, -1.0]], dtype=F64)  # two tied pairs
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    for dtype in (F64, torch.float32, torch.bfloat16):
        fit = fit_gmm_em(x.to(dtype), mask, 3)
        assert fit.mu.dtype == dtype
        for t in (fit.logits, fit.mu, fit.log_sigma):
            assert torch.isfinite(t).all()
    fit = fit_gmm_em(x, mask, 3)
    floor_sigma = 0.5 * math.log(1e-3)
    torch.testing.assert_close(fit.mu[0], torch.full((3,), 0.5, dtype=F64))
    torch.testing.assert_close(fit.log_sigma[0], torch.full((3,), floor_sigma, dtype=F64))
    # the empty row is documented as a standard normal with uniform weights
    assert torch.equal(fit.mu[2], torch.zeros(3, dtype=F64)) and torch.equal(fit.log_sigma[2], torch.zeros(3, dtype=F64))
    assert torch.equal(fit.logits[2], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(fit.mu[3], torch.full((3,), 0.4, dtype=F64))
    torch.testing.assert_close(fit.log_sigma[3], torch.full((3,), floor_sigma, dtype=F64))
    # the two tied pairs: the mixture puts half its mass on each value
    torch.testing.assert_close(fit.mean()[4], torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.variance()[4], torch.tensor(1.0 + 1e-3, dtype=F64), rtol=1e-9, atol=1e-9)
    # no columns at all, and iters=0 (the deterministic start) are fine too
    empty = fit_gmm_em(torch.zeros(3, 0), None, 2)
    assert torch.equal(empty.mu, torch.zeros(3, 2))
    start = fit_gmm_em(x, mask, 3, iters=0)
    assert all(torch.isfinite(t).all() for t in (start.logits, start.mu, start.log_sigma))


def test_fit_gmm_em_is_deterministic_and_sorted():
    x = torch.rand(50, 9) * 2 - 1
    a, b = fit_gmm_em(x, None, 3), fit_gmm_em(x.clone(), None, 3)
    assert torch.equal(a.mu, b.mu) and torch.equal(a.logits, b.logits)
    assert (a.mu[:, 1:] >= a.mu[:, :-1]).all()


# ---- grid histograms ----------------------------------------------------------------------


def test_grid_histogram_matches_scipy_gaussian_kde():
    g = torch.Generator().manual_seed(14)
    x = torch.rand(6, 10, generator=g, dtype=F64) * 2 - 1
    mask = torch.rand(6, 10, generator=g) > 0.3
    mask[:, :2] = True
    grid = torch.linspace(-1, 1, 41, dtype=F64)
    h = 0.15
    hist = grid_histogram(x, mask, grid, h)
    assert hist.shape == (6, 41)
    for r in range(6):
        data = x[r][mask[r]].numpy()
        kde = stats.gaussian_kde(data, bw_method=h / data.std(ddof=1))  # scipy's bandwidth = factor × std
        dens = kde(grid.numpy())
        np.testing.assert_allclose(hist[r].numpy(), dens / dens.sum(), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(hist.sum(-1), torch.ones(6, dtype=F64))


def test_grid_histogram_empty_rows_far_scores_and_padding():
    grid = torch.linspace(-1, 1, 5)
    x = torch.tensor([[0.3, float("nan")], [0.0, 0.0], [50.0, 0.0], [-0.2, 0.6]])
    mask = torch.tensor([[True, False], [False, False], [True, False], [True, True]])
    hist = grid_histogram(x, mask, grid, 0.01)
    torch.testing.assert_close(hist.sum(-1), torch.ones(4))
    assert torch.isfinite(hist).all()
    torch.testing.assert_close(hist[1], torch.full((5,), 0.2))  # no valid score: uniform
    torch.testing.assert_close(hist[2], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))  # far away: nearest grid point
    torch.testing.assert_close(hist[0], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))  # NaN padding is ignored
    # brute force with numpy for a wide bandwidth
    wide = grid_histogram(x, mask, grid, 0.7).double()
    k = np.exp(-0.5 * ((grid.numpy()[:, None] - np.array([-0.2, 0.6])[None]) / 0.7) ** 2).sum(-1)
    np.testing.assert_allclose(wide[3].numpy(), k / k.sum(), rtol=1e-6)
    assert grid_histogram(x[:, :1], None, grid, 0.1).dtype == torch.float32


def test_grid_probabilities_are_cdf_differences():
    grid = torch.linspace(-2, 2, 9, dtype=F64)
    d = random_gmm((3,), 3, seed=15)
    p = grid_probabilities(d, grid)
    edges = (0.5 * (grid[1:] + grid[:-1])).numpy()
    for r in range(3):
        w, mu, s = gmm_np(d, r)
        cdf = np.concatenate([[0.0], [mix_cdf(w, mu, s, e) for e in edges], [1.0]])
        np.testing.assert_allclose(p[r].numpy(), np.diff(cdf), atol=1e-14)
    q = random_qset((2,), seed=16)
    pq = grid_probabilities(q, grid)
    for r in range(2):
        u, k = np_knots(q.values[r].numpy(), TAUS19.numpy())
        cdf = np.concatenate([[0.0], np.interp(edges, k, u, left=0, right=1), [1.0]])
        np.testing.assert_allclose(pq[r].numpy(), np.diff(cdf), atol=1e-14)
    torch.testing.assert_close(pq.sum(-1), torch.ones(2, dtype=F64))
    assert torch.equal(grid_probabilities(d, grid[:1]), torch.ones(3, 1, dtype=F64))


# ---- gradients ----------------------------------------------------------------------------


def test_gmm_functionals_have_correct_gradients():
    # fp64 gradcheck (finite differences) w.r.t. all three parameter tensors; the quantile's
    # gradient comes from the implicit-function theorem, not from the bisection's branches.
    d = random_gmm((3,), 3, seed=21)
    params = tuple(t.clone().requires_grad_() for t in (d.logits, d.mu, d.log_sigma))
    levels = torch.tensor([0.05, 0.5, 0.97], dtype=F64)
    fns = [
        lambda lg, mu, ls: GaussianMixture(lg, mu, ls).quantile(levels),
        lambda lg, mu, ls: certainty_equivalent(GaussianMixture(lg, mu, ls), 1.7),
        lambda lg, mu, ls: cvar(GaussianMixture(lg, mu, ls), 0.1),
        lambda lg, mu, ls: mean_variance(GaussianMixture(lg, mu, ls), 0.5),
        lambda lg, mu, ls: GaussianMixture(lg, mu, ls).cdf(levels * 2 - 1),
    ]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7)
    # and the quantile's value is unchanged when gradients are tracked
    assert torch.equal(GaussianMixture(*params).quantile(levels).detach(), d.quantile(levels))


def test_quantile_set_functionals_have_correct_gradients():
    v = torch.sort(torch.randn(3, 7, dtype=F64), -1).values.requires_grad_()
    taus = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.55, 0.8, 0.97], dtype=F64)
    fns = [
        lambda x: QuantileDistribution(x, taus).mean(),
        lambda x: QuantileDistribution(x, taus).variance(),
        lambda x: certainty_equivalent(QuantileDistribution(x, taus), -0.8),
        lambda x: cvar(QuantileDistribution(x, taus), 0.2),
        lambda x: QuantileDistribution(x, taus).quantile(torch.tensor([0.01, 0.42], dtype=F64)),
    ]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-7)


# ---- devices ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_everything_runs_on_device(device):
    d = random_gmm((4,), 3, device=device)
    q = random_qset((4,), device=device)
    x = torch.linspace(-2, 2, 7, dtype=F64, device=device)
    dc, qc = random_gmm((4,), 3), random_qset((4,))
    for dist, cpu in ((d, dc), (q, qc)):
        for f in (lambda t: t.mean(), lambda t: t.variance(), lambda t: t.cdf(x.to(t.mean().device)),
                  lambda t: t.quantile(torch.tensor([0.1, 0.5], dtype=F64, device=t.mean().device)),
                  lambda t: certainty_equivalent(t, 1.3), lambda t: cvar(t, 0.2), lambda t: value_at_risk(t, 0.2),
                  lambda t: mean_variance(t, 0.5)):
            out = f(dist)
            assert out.device.type == device
            torch.testing.assert_close(out.cpu(), f(cpu), rtol=1e-9, atol=1e-9)
        assert dist.sample(5, torch.Generator(device=device).manual_seed(0)).shape == (4, 5)
    s = torch.rand(16, 10, dtype=F64) * 2 - 1
    m = torch.rand(16, 10) > 0.2
    fit_d, fit_c = fit_gmm_em(s.to(device), m.to(device), 3), fit_gmm_em(s, m, 3)
    torch.testing.assert_close(fit_d.mu.cpu(), fit_c.mu, rtol=1e-8, atol=1e-8)
    grid = torch.linspace(-1, 1, 11, dtype=F64)
    torch.testing.assert_close(grid_histogram(s.to(device), m.to(device), grid.to(device), 0.1).cpu(),
                               grid_histogram(s, m, grid, 0.1))


# ---- bad input ----------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    v = torch.randn(4, 19)
    with pytest.raises(ValueError, match=r"taus must be strictly increasing"):
        QuantileDistribution(v[:, :3], torch.tensor([0.1, 0.5, 0.3]))
    with pytest.raises(ValueError, match=r"taus must be strictly increasing"):
        QuantileDistribution(v[:, :2], torch.tensor([0.2, 0.2]))
    with pytest.raises(ValueError, match=r"taus must lie strictly inside \(0, 1\)"):
        QuantileDistribution(v[:, :2], torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"taus must lie strictly inside \(0, 1\)"):
        QuantileDistribution(v[:, :2], torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"taus must have shape \(Q,\) = \(19,\)"):
        QuantileDistribution(v, TAUS19[:5])
    with pytest.raises(ValueError, match=r"values must have shape \(..., Q\) with Q >= 1"):
        QuantileDistribution(torch.zeros(4, 0), torch.zeros(0))
    with pytest.raises(TypeError, match=r"values must be a torch.Tensor"):
        QuantileDistribution([0.1, 0.2], TAUS19[:2])
    q = QuantileDistribution(v, TAUS19.float())
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 1\], got 1.5"):
        q.quantile(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"x must have shape \(..., G\)"):
        q.cdf(torch.tensor(0.3))
    with pytest.raises(ValueError, match=r"x must have shape \(..., G\) whose leading dims broadcast"):
        q.cdf(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"n must be a non-negative int"):
        q.sample(-1)

    with pytest.raises(ValueError, match=r"logits must have shape \(..., K\) with K >= 1"):
        GaussianMixture(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"mu must have the shape of logits \(3, 2\), got \(3, 3\)"):
        GaussianMixture(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"log_sigma must have the dtype of logits"):
        GaussianMixture(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"mu must be on the same device as logits"):
        GaussianMixture(torch.zeros(3, 2), torch.zeros(3, 2, device="meta"), torch.zeros(3, 2))
    d = random_gmm((3,), 2)
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 1\]"):
        d.quantile(torch.tensor([-0.1], dtype=F64))

    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must"):
            cvar(d, alpha)
        with pytest.raises(ValueError, match=r"alpha must"):
            value_at_risk(q, alpha)
    with pytest.raises(ValueError, match=r"alpha must be finite"):
        mean_variance(d, float("inf"))
    with pytest.raises(ValueError, match=r"lam must be finite"):
        certainty_equivalent(d, float("nan"))
    with pytest.raises(ValueError, match=r"lam must be a float or a tensor broadcastable to the batch shape \(3,\)"):
        certainty_equivalent(d, torch.ones(4, dtype=F64))
    with pytest.raises(TypeError, match=r"dist must be a QuantileDistribution or a GaussianMixture"):
        certainty_equivalent(torch.zeros(3), 1.0)

    s = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
        fit_gmm_em(s, None, 0)
    with pytest.raises(ValueError, match=r"mask must have the shape of scores \(4, 6\), got \(4, 5\)"):
        fit_gmm_em(s, torch.ones(4, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        fit_gmm_em(s, torch.ones(4, 6), 2)
    with pytest.raises(ValueError, match=r"var_floor must be > 0"):
        fit_gmm_em(s, None, 2, var_floor=0.0)
    with pytest.raises(ValueError, match=r"iters must be an int >= 0"):
        fit_gmm_em(s, None, 2, iters=-1)
    with pytest.raises(ValueError, match=r"tol must be >= 0"):
        fit_gmm_em(s, None, 2, tol=-1.0)
    grid = torch.linspace(-1, 1, 5)
    for bw in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"bandwidth must be"):
            grid_histogram(s, None, grid, bw)
    with pytest.raises(ValueError, match=r"grid must have shape \(G,\) with G >= 1"):
        grid_histogram(s, None, grid[None], 0.1)
    with pytest.raises(ValueError, match=r"mask must have the shape of scores"):
        grid_histogram(s, torch.ones(4, 2, dtype=torch.bool), grid, 0.1)
    with pytest.raises(ValueError, match=r"grid must be strictly increasing"):
        grid_probabilities(d, torch.tensor([0.0, -1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"values must be a floating tensor"):
        non_crossing(torch.ones(3, 4, dtype=torch.long))
