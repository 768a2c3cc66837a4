"""prefcore.utility: the utility spec parser and the utilities' values against independent maths."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize
from scipy.special import logsumexp
from scipy.stats import norm

from prefcore.distributions import GaussianMixture, QuantileDistribution
from prefcore.utility import Utility, parse_utility


@pytest.mark.parametrize("spec, kind, param", [
    ("mean", "mean", None), ("ce:2", "ce", 2.0), (" CE:-0.5 ", "ce", -0.5), ("ce:0", "ce", 0.0),
    ("mean-var:0.5", "mean-var", 0.5), ("cvar:0.1", "cvar", 0.1), ("cvar:1", "cvar", 1.0),
    ("quantile:0.05", "quantile", 0.05), ("quantile: 0.5", "quantile", 0.5),
])
def test_parse_valid(spec, kind, param):
    u = parse_utility(spec)
    assert (u.kind, u.param) == (kind, param)
    assert parse_utility(str(u)) == u
    assert parse_utility(u) is u


@pytest.mark.parametrize("spec, match", [
    ("meen", r"--utility: unknown utility 'meen'.*mean \| ce:λ"),
    ("ce", r"--utility: 'ce' needs a parameter"),
    ("cvar:", r"--utility: 'cvar' needs a parameter"),
    ("ce:abc", r"--utility: λ in 'ce:abc' must be a number, got 'abc'"),
    ("ce:nan", r"--utility: λ .* must be a finite number"),
    ("mean-var:inf", r"--utility: α .* must be a finite number"),
    ("cvar:0", r"--utility: α of cvar must lie in \(0, 1\], got 0"),
    ("cvar:1.5", r"--utility: α of cvar must lie in \(0, 1\]"),
    ("quantile:1", r"--utility: τ of quantile must lie strictly inside \(0, 1\)"),
    ("quantile:-0.1", r"--utility: τ of quantile"),
    ("mean:1", r"--utility: 'mean' takes no parameter"),
    (3, r"--utility must be a string"),
])
def test_parse_errors_name_the_setting(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_utility(spec, setting="--utility")


def test_utility_constructor_checks():
    with pytest.raises(ValueError, match="kind"):
        Utility("median")
    with pytest.raises(ValueError, match="cvar"):
        Utility("cvar", 2.0)
    with pytest.raises(ValueError, match="no parameter"):
        Utility("mean", 1.0)


def _gmm():
    logits = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.0, -1.0]], dtype=torch.float64)
    mu = torch.tensor([[-0.9, 0.2, 0.6], [0.5, -0.4, 0.1]], dtype=torch.float64)
    log_sigma = torch.tensor([[-2.0, -1.5, -1.2], [-1.0, -2.5, -1.7]], dtype=torch.float64)
    return GaussianMixture(logits, mu, log_sigma), logits.softmax(-1).numpy(), mu.numpy(), log_sigma.exp().numpy()


def test_gmm_utilities_match_independent_maths():
    dist, w, mu, sd = _gmm()
    for b in range(2):
        pdf = lambda x: float((w[b] * norm.pdf(x, mu[b], sd[b])).sum())  # noqa: E731
        cdf = lambda x: float((w[b] * norm.cdf(x, mu[b], sd[b])).sum())  # noqa: E731
        mean = float((w[b] * mu[b]).sum())
        var = float((w[b] * (sd[b] ** 2 + mu[b] ** 2)).sum()) - mean ** 2
        lam = 2.0
        ce = -math.log(float((w[b] * np.exp(-lam * mu[b] + 0.5 * lam ** 2 * sd[b] ** 2)).sum())) / lam
        q10 = optimize.brentq(lambda x: cdf(x) - 0.1, -10, 10, xtol=1e-13)
        a = 0.25
        qa = optimize.brentq(lambda x: cdf(x) - a, -10, 10, xtol=1e-13)
        cvar = integrate.quad(lambda x: x * pdf(x), -np.inf, qa, limit=200)[0] / a
        want = {"mean": mean, "mean-var:0.5": mean - 0.5 * var, "ce:2": ce, "quantile:0.1": q10, "cvar:0.25": cvar}
        for spec, v in want.items():
            got = float(parse_utility(spec)(dist)[b])
            assert got == pytest.approx(v, abs=1e-7), spec


def test_quantile_set_ce_is_qrm_equal_mass_exp_utility():
    taus = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    values = torch.tensor([[-0.8, -0.3, 0.1, 0.4, 0.7], [0.0, 0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    dist = QuantileDistribution(values, taus)
    for lam in (0.5, 3.0, -1.0):
        want = -(logsumexp(-lam * values.numpy(), axis=-1) - math.log(5)) / lam
        torch.testing.assert_close(parse_utility(f"ce:{lam}")(dist).double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
    # a quantile level on a knot returns the knot's value
    torch.testing.assert_close(parse_utility("quantile:0.25")(dist).double(), values[:, 1])
    # the risk-averse orderings: ce:λ and cvar below the mean for the spread row
    m = parse_utility("mean")(dist)
    assert float(parse_utility("ce:3")(dist)[0]) < float(m[0]) and float(parse_utility("cvar:0.2")(dist)[0]) < float(m[0])


def test_scalar_rewards_only_take_risk_neutral_utilities():
    r = torch.tensor([0.1, -0.3])
    assert parse_utility("mean")(r) is r
    assert parse_utility("ce:0")(r) is r
    with pytest.raises(ValueError, match="needs a reward distribution"):
        parse_utility("cvar:0.1")(r)
    with pytest.raises(TypeError, match="dist"):
        parse_utility("mean")([0.1, 0.2])
