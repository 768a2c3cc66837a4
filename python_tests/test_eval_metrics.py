"""prefcore.eval metrics against independent numpy/scipy computations and closed forms.

Tolerances: float64 inputs match the numpy/scipy value to 1e-12 (rel) unless a quadrature or a
discretisation is involved, where the tolerance is stated at the assertion.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import prefcore  # noqa: F401
from prefcore.distributions import GaussianMixture, QuantileDistribution, grid_histogram, grid_probabilities
from prefcore.eval import crps, crps_gmm, crps_quantile, crr, das, l1, nll, pairwise_accuracy, pearson, pmr, quantile_coverage, uce
from python_tests.helpers import DEVICES

F64 = torch.float64
TAUS19 = torch.linspace(0.05, 0.95, 19, dtype=F64)


def ragged(b, n, seed, empty_row=True, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(b, n, generator=g, dtype=F64) * 2 - 1).to(dtype)
    m = torch.rand(b, n, generator=g) > 0.3
    m[:, 0] = True
    if empty_row:
        m[1] = False
    return x, m


def np_pinball(u, tau):
    return u * (tau - (u < 0))


def normal_crps(y, mu, s):
    z = (y - mu) / s
    return s * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


def gmm_np(d, r):
    return torch.softmax(d.logits.double(), -1)[r].numpy(), d.mu.double()[r].numpy(), d.log_sigma.double().exp()[r].numpy()


def random_gmm(b, k, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(b, k, generator=g, dtype=F64).to(device),
                           (0.5 * torch.randn(b, k, generator=g, dtype=F64)).to(device),
                           (0.3 * torch.randn(b, k, generator=g, dtype=F64) - 1.0).to(device))


# ---- point-reward metrics -----------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_as_given():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 4, (200,), generator=g).double()
    r = torch.randint(0, 4, (200,), generator=g).double()
    cn, rn = c.numpy(), r.numpy()
    assert pairwise_accuracy(c, r).item() == pytest.approx(np.mean((cn > rn) + 0.5 * (cn == rn)), abs=1e-15)
    assert pairwise_accuracy(c, r, tie=0.0).item() == pytest.approx(np.mean(cn > rn), abs=1e-15)
    assert pairwise_accuracy(c.reshape(20, 10), r.reshape(20, 10), tie=1.0).item() == pytest.approx(np.mean(cn >= rn), abs=1e-15)
    assert pairwise_accuracy(torch.empty(0), torch.empty(0)).item() == 0.0


def test_pearson_and_l1_match_scipy_numpy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 30, generator=g, dtype=F64)
    y = 0.6 * x + torch.randn(5, 30, generator=g, dtype=F64)
    rho = pearson(x, y)
    assert rho.shape == (5,)
    for i in range(5):
        assert rho[i].item() == pytest.approx(stats.pearsonr(x[i].numpy(), y[i].numpy())[0], rel=1e-12)
    assert pearson(x.T, y.T, dim=0)[2].item() == pytest.approx(rho[2].item(), rel=1e-12)
    assert pearson(x[0], -3 * x[0] + 1).item() == pytest.approx(-1.0, abs=1e-15)
    assert pearson(torch.ones(7, dtype=F64), x[0, :7]).item() == 0.0  # constant input: documented 0
    # margin paper: RM preference σ(r_A − r_B) against the aggregate user preference (fraction)
    pref = torch.sigmoid(x[0] - y[0])
    frac = torch.rand(30, generator=g, dtype=F64)
    assert l1(pref, frac).item() == pytest.approx(np.mean(np.abs(pref.numpy() - frac.numpy())), rel=1e-12)
    np.testing.assert_allclose(l1(x, y).numpy(), np.abs(x.numpy() - y.numpy()).mean(-1), rtol=1e-12)


# ---- distributional metrics ---------------------------------------------------------------


def test_quantile_coverage_matches_numpy_and_is_calibrated_for_the_true_quantiles():
    x, m = ragged(9, 8, seed=2)
    g = torch.Generator().manual_seed(3)
    v = torch.sort(torch.randn(9, 19, generator=g, dtype=F64) * 0.5, -1).values
    cov = quantile_coverage(v, TAUS19, x, m)
    xn, mn, vn = x.numpy(), m.numpy(), v.numpy()
    expect = [np.sum((xn <= vn[:, q:q + 1]) & mn) / mn.sum() for q in range(19)]
    np.testing.assert_allclose(cov.numpy(), expect, rtol=1e-12)
    # one target per item, shape (B,)
    np.testing.assert_allclose(quantile_coverage(v, TAUS19, x[:, 0]).numpy(), (xn[:, :1] <= vn).mean(0), rtol=1e-12)
    # targets drawn from N(0, 1) with the true quantiles predicted: coverage ≈ τ (binomial SE ≈ 0.0016)
    t = torch.randn(2000, 50, generator=g, dtype=F64)
    true_q = torch.from_numpy(stats.norm.ppf(TAUS19.numpy())).expand(2000, 19)
    assert (quantile_coverage(true_q, TAUS19, t) - TAUS19).abs().max() < 0.01


def test_crps_quantile_is_twice_the_pinball_average_and_approaches_the_normal_crps():
    x, m = ragged(6, 7, seed=4)
    g = torch.Generator().manual_seed(5)
    v = torch.sort(torch.randn(6, 19, generator=g, dtype=F64), -1).values
    got = crps_quantile(v, TAUS19, x, m, reduction="none")
    for b in range(6):
        ys = x[b][m[b]].numpy()
        if len(ys) == 0:
            assert got[b].item() == 0.0
            continue
        expect = np.mean([2 / 19 * np.sum(np_pinball(y - v[b].numpy(), TAUS19.numpy())) for y in ys])
        assert got[b].item() == pytest.approx(expect, rel=1e-12)
    has = m.any(-1)
    assert crps_quantile(v, TAUS19, x, m).item() == pytest.approx(got[has].mean().item(), rel=1e-12)
    assert crps(QuantileDistribution(v, TAUS19), x, m).item() == pytest.approx(got[has].mean().item(), rel=1e-12)
    # many evenly spaced levels of N(0.2, 0.5²): the quantile-score CRPS → the normal's closed form
    taus = torch.arange(1, 2000, dtype=F64) / 2000
    vals = torch.from_numpy(stats.norm.ppf(taus.numpy(), 0.2, 0.5))[None]
    for y in (-1.0, 0.2, 0.9):
        approx = crps_quantile(vals, taus, torch.tensor([y], dtype=F64)).item()
        assert approx == pytest.approx(normal_crps(y, 0.2, 0.5), abs=2e-3)


def test_crps_gmm_matches_the_integral_definition():
    d = random_gmm(4, 3, seed=6)
    x, m = ragged(4, 5, seed=7)
    got = crps_gmm(d, x, m, reduction="none")
    for b in range(4):
        w, mu, s = gmm_np(d, b)
        cdf = lambda t: float(np.sum(w * stats.norm.cdf(t, mu, s)))  # noqa: E731
        lo, hi = (mu - 30 * s).min() - 2, (mu + 30 * s).max() + 2
        vals = []
        for y in x[b][m[b]].tolist():
            # CRPS(F, y) = ∫ (F(t) − 1[t ≥ y])² dt
            left = integrate.quad(lambda t: cdf(t) ** 2, lo, y, limit=400, epsabs=1e-13, epsrel=1e-11)[0]
            right = integrate.quad(lambda t: (1 - cdf(t)) ** 2, y, hi, limit=400, epsabs=1e-13, epsrel=1e-11)[0]
            vals.append(left + right)
        expect = np.mean(vals) if vals else 0.0
        assert got[b].item() == pytest.approx(expect, rel=1e-8, abs=1e-12)
    # one component: the normal closed form; crps() dispatches to crps_gmm
    n = GaussianMixture(torch.zeros(3, 1, dtype=F64), torch.tensor([[0.0], [0.5], [-1.0]], dtype=F64),
                        torch.tensor([[0.0], [-1.0], [0.5]], dtype=F64))
    y = torch.tensor([0.3, 0.5, 2.0], dtype=F64)
    expect = [normal_crps(y[i].item(), n.mu[i, 0].item(), math.exp(n.log_sigma[i, 0].item())) for i in range(3)]
    np.testing.assert_allclose(crps(n, y, reduction="none").numpy(), expect, rtol=1e-12)


def test_nll_matches_scipy_and_ignores_padding():
    d = random_gmm(5, 3, seed=8)
    x, m = ragged(5, 6, seed=9)
    xp = torch.where(m, x, torch.full_like(x, float("nan")))
    got = nll(d, xp, m, reduction="none")
    for b in range(5):
        w, mu, s = gmm_np(d, b)
        ys = x[b][m[b]].numpy()
        expect = -np.mean([np.log(np.sum(w * stats.norm.pdf(y, mu, s))) for y in ys]) if len(ys) else 0.0
        assert got[b].item() == pytest.approx(expect, rel=1e-12, abs=1e-14)
    assert nll(d, xp, m).item() == pytest.approx(got[m.any(-1)].mean().item(), rel=1e-12)
    assert torch.isfinite(crps_gmm(d, xp, m, reduction="none")).all()


def test_uce_is_the_mse_of_variances():
    x, m = ragged(8, 9, seed=10)
    m[2] = False
    m[2, 3] = True  # a single score: empirical variance 0 (population), undefined (unbiased)
    pred = torch.rand(8, dtype=F64) * 0.3
    for unbiased in (False, True):
        errs = []
        for b in range(8):
            ys = x[b][m[b]].numpy()
            if len(ys) > int(unbiased):
                errs.append((pred[b].item() - np.var(ys, ddof=int(unbiased))) ** 2)
        assert uce(pred, x, m, unbiased=unbiased).item() == pytest.approx(np.mean(errs), rel=1e-12)
    # a distribution's own variance is used when one is passed
    d = random_gmm(8, 3, seed=11)
    assert uce(d, x, m).item() == pytest.approx(uce(d.variance(), x, m).item(), rel=1e-14)


def test_das_matches_scipy_kl_and_the_continuous_kl_on_a_fine_grid():
    g = torch.Generator().manual_seed(12)
    p = torch.rand(5, 11, generator=g, dtype=F64)
    q = torch.rand(5, 11, generator=g, dtype=F64)
    p[0, :4] = 0.0  # zeros in p contribute nothing
    got = das(p, q, reduction="none")
    expect = np.exp(-np.array([stats.entropy(p[i].numpy(), q[i].numpy()) for i in range(5)]))
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12)
    assert das(p, q).item() == pytest.approx(expect.mean(), rel=1e-12)
    assert das(p, 3 * p).item() == pytest.approx(1.0, abs=1e-15)  # rows are normalised
    q0 = q.clone()
    q0[1, 5] = 0.0
    assert das(p, q0, reduction="none")[1].item() == 0.0  # mass where the reference has none: KL = ∞
    # DFL eq. 6 between two normals, discretised on a fine shared grid: exp(−KL) of the closed form
    grid = torch.linspace(-8, 8, 3201, dtype=F64)
    a = GaussianMixture(torch.zeros(1, 1, dtype=F64), torch.tensor([[0.2]], dtype=F64), torch.tensor([[math.log(0.5)]], dtype=F64))
    b = GaussianMixture(torch.zeros(1, 1, dtype=F64), torch.tensor([[-0.1]], dtype=F64), torch.tensor([[math.log(0.8)]], dtype=F64))
    kl = math.log(0.8 / 0.5) + (0.5**2 + 0.3**2) / (2 * 0.8**2) - 0.5
    assert das(grid_probabilities(a, grid), grid_probabilities(b, grid)).item() == pytest.approx(math.exp(-kl), abs=1e-5)
    # and from scores: a KDE histogram of scores drawn from the reference itself scores near 1
    scores = b.sample(4000, torch.Generator().manual_seed(0))
    hist = grid_histogram(scores, None, grid, 0.05)
    assert das(hist, grid_probabilities(b, grid)).item() > 0.99


def test_crr_any_evaluator_strictly_below_threshold():
    x = torch.tensor([[0.5, -0.75, 0.9], [-0.7, 0.0, 0.1], [-0.9, 0.5, 0.5], [0.3, 0.2, 0.1], [-1.0, -1.0, -1.0]], dtype=F64)
    m = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    # row 0: −0.75 < −0.7 → catastrophic; row 1: −0.7 is not below −0.7; row 2: the −0.9 is masked;
    # row 3: fine; row 4: no valid score → left out → 1/4
    assert crr(x, m).item() == pytest.approx(0.25, abs=1e-15)
    assert crr(x, m, threshold=-0.69).item() == pytest.approx(0.5, abs=1e-15)
    assert crr(x).item() == pytest.approx(3 / 5, abs=1e-15)  # unmasked: rows 0, 2, 4
    big, bm = ragged(300, 10, seed=14)
    bn, bmn = big.numpy(), bm.numpy()
    has = bmn.any(-1)
    assert crr(big, bm).item() == pytest.approx(((bn < -0.7) & bmn).any(-1)[has].mean(), rel=1e-12)
    assert crr(big[:, 0]).item() == pytest.approx((bn[:, 0] < -0.7).mean(), rel=1e-12)
    assert crr(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_pmr_compares_mean_evaluator_scores_with_ties():
    model = torch.tensor([[0.5, 0.1, 0.0], [0.25, 0.25, 0.25], [-0.5, 0.9, 0.0], [0.3, 0.0, 0.0]], dtype=F64)
    ref = torch.tensor([[0.2, 0.2], [0.25, 0.5], [0.5, 0.5], [0.0, 0.0]], dtype=F64)
    mm = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    rm = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    # item 0: 0.3 > 0.2 win; item 1: 0.25 = 0.25 tie (exact); item 2: 0.133 < 0.5 loss; item 3: no ref score → left out
    assert pmr(model, ref, mm, rm).item() == pytest.approx(1.5 / 3, abs=1e-15)
    assert pmr(model, ref, mm, rm, tie=0.0).item() == pytest.approx(1 / 3, abs=1e-15)
    # already-aggregated (B,) scores against numpy
    g = torch.Generator().manual_seed(15)
    a = torch.randint(0, 5, (500,), generator=g).double()
    b = torch.randint(0, 5, (500,), generator=g).double()
    assert pmr(a, b).item() == pytest.approx(np.mean((a.numpy() > b.numpy()) + 0.5 * (a.numpy() == b.numpy())), abs=1e-15)


def test_reductions_and_empty_rows():
    x, m = ragged(5, 4, seed=16)  # row 1 is empty
    d = random_gmm(5, 2, seed=17)
    v = torch.sort(torch.randn(5, 19, dtype=F64), -1).values
    for fn in (lambda r: crps_gmm(d, x, m, reduction=r), lambda r: nll(d, x, m, reduction=r),
               lambda r: crps_quantile(v, TAUS19, x, m, reduction=r)):
        per = fn("none")
        assert per.shape == (5,) and per[1].item() == 0.0 and torch.isfinite(per).all()
        assert fn("mean").item() == pytest.approx(per[m.any(-1)].mean().item(), rel=1e-12)
    none = torch.zeros(5, 4, dtype=torch.bool)
    assert nll(d, x, none).item() == 0.0 and uce(d, x, none).item() == 0.0
    assert torch.equal(quantile_coverage(v, TAUS19, x, none), torch.zeros(19, dtype=F64))


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_run_on_device(device):
    x, m = ragged(6, 5, seed=18)
    d, dc = random_gmm(6, 3, seed=19, device=device), random_gmm(6, 3, seed=19)
    v = torch.sort(torch.randn(6, 19, dtype=F64), -1).values
    xd, md, vd, td = x.to(device), m.to(device), v.to(device), TAUS19.to(device)
    pairs = [
        (crps_gmm(d, xd, md), crps_gmm(dc, x, m)), (nll(d, xd, md), nll(dc, x, m)), (uce(d, xd, md), uce(dc, x, m)),
        (crps_quantile(vd, td, xd, md), crps_quantile(v, TAUS19, x, m)),
        (quantile_coverage(vd, td, xd, md), quantile_coverage(v, TAUS19, x, m)), (crr(xd, md), crr(x, m)),
        (pmr(xd, xd.flip(0), md, md.flip(0)), pmr(x, x.flip(0), m, m.flip(0))), (pearson(xd, xd.flip(0)), pearson(x, x.flip(0))),
        (pairwise_accuracy(xd, xd.flip(1)), pairwise_accuracy(x, x.flip(1))), (l1(xd, xd.flip(0)), l1(x, x.flip(0))),
        (das(xd.abs() + 0.1, xd.flip(0).abs() + 0.1), das(x.abs() + 0.1, x.flip(0).abs() + 0.1)),
    ]
    for got, cpu in pairs:
        assert got.device.type == device
        torch.testing.assert_close(got.cpu(), cpu, rtol=1e-9, atol=1e-12)


def test_float32_inputs():
    x, m = ragged(6, 5, seed=20, dtype=torch.float32)
    d = GaussianMixture(*(t.float() for t in (random_gmm(6, 3).logits, random_gmm(6, 3).mu, random_gmm(6, 3).log_sigma)))
    d64 = GaussianMixture(d.logits.double(), d.mu.double(), d.log_sigma.double())
    for f in (lambda dd, xx: crps_gmm(dd, xx, m), lambda dd, xx: nll(dd, xx, m), lambda dd, xx: uce(dd, xx, m)):
        out = f(d, x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), f(d64, x.double()), rtol=1e-5, atol=1e-6)


# ---- bad input ----------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    a, b = torch.randn(4), torch.randn(5)
    with pytest.raises(ValueError, match=r"r_rejected must have the shape of r_chosen \(4,\), got \(5,\)"):
        pairwise_accuracy(a, b)
    with pytest.raises(ValueError, match=r"tie must lie in \[0, 1\]"):
        pairwise_accuracy(a, a, tie=2.0)
    with pytest.raises(ValueError, match=r"y must have the shape of x"):
        pearson(a, b)
    with pytest.raises(ValueError, match=r"y must have the shape of x"):
        l1(a, b)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        l1([1.0], a)
    v, x = torch.sort(torch.randn(4, 19), -1).values, torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"taus must have shape \(Q,\) = \(19,\)"):
        quantile_coverage(v, TAUS19[:3].float(), x)
    with pytest.raises(ValueError, match=r"taus must lie strictly inside \(0, 1\)"):
        crps_quantile(v, torch.linspace(0, 1, 19), x)
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\) or \(4, N\)"):
        crps_quantile(v, TAUS19.float(), torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"mask must have the shape of targets \(4, 6\), got \(4, 5\)"):
        quantile_coverage(v, TAUS19.float(), x, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        quantile_coverage(v, TAUS19.float(), x, torch.ones(4, 6))
    d = random_gmm(4, 3)
    with pytest.raises(TypeError, match=r"dist must be a GaussianMixture"):
        nll(QuantileDistribution(v, TAUS19.float()), x)
    with pytest.raises(TypeError, match=r"dist must be a QuantileDistribution or a GaussianMixture"):
        crps(v, x)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        crps_gmm(d, x.double(), reduction="sum")
    with pytest.raises(ValueError, match=r"scores must have shape \(4, N\) to match pred_var"):
        uce(torch.rand(4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"q must have the shape of p"):
        das(torch.rand(3, 5), torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"p and q must be finite and non-negative"):
        das(-torch.rand(3, 5), torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"every row of p and q must have a positive sum"):
        das(torch.zeros(3, 5), torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"threshold must be finite"):
        crr(x, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\) or \(B, N\)"):
        crr(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"ref_scores must have shape \(B,\) or \(B, N\) with B = 4"):
        pmr(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"ref_mask must have the shape of ref_scores"):
        pmr(x, x, None, torch.ones(4, 2, dtype=torch.bool))
