"""prefcore.data.synthetic: determinism under a seed, no global RNG use, and ground truth that
matches the data it generates (Monte-Carlo frequencies within 4–5 standard errors) and
independent implementations (scipy).
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from prefcore.data import synthetic as S


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# ---- determinism -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make",
    [
        lambda g: tuple(S.sample_luce_pairs(300, g)),
        lambda g: tuple(S.sample_annotator_mixture_pairs(300, g)),
        lambda g: tuple(S.sample_pbde_pairs(torch.linspace(-3, 0, 9), 300, g, f=torch.arange(1, 10).double())),
        lambda g: (lambda w: (w.features, w.scores, w.mask, w.attribute_scores, w.annotator_ids, w.annotator_types))(
            S.make_ratings_world(g, S.RatingsWorldConfig(num_items=64, num_prompts=20))),
        lambda g: (lambda p: (p.votes, p.label, p.prob_a, p.response_a))(
            S.sample_vote_pairs(S.make_ratings_world(g, S.RatingsWorldConfig(num_items=16)), 50, 7, g)),
    ],
)
def test_deterministic_under_seed_and_no_global_rng(make):
    state = torch.random.get_rng_state()
    first = make(gen(11))
    assert torch.equal(torch.random.get_rng_state(), state), "generators must not touch the global RNG"
    _assert_same(first, make(gen(11)))
    other = make(gen(12))
    assert any(not torch.equal(x, y) for x, y in zip(first, other) if isinstance(x, torch.Tensor) and x.is_floating_point())


# ---- world (a) ---------------------------------------------------------------------------

def test_toy_density_matches_scipy_truncated_normals():
    p = S.toy_preference_density()
    x = np.linspace(-10, 10, 2001)
    # σ in the paper's eq. 10 is a standard deviation: 0.25 and 1.0.
    ref = sum(w * stats.truncnorm((-10 - m) / s, (10 - m) / s, loc=m, scale=s).pdf(x)
              for w, m, s in ((0.4, -2.5, 0.25), (0.6, 2.5, 1.0)))
    np.testing.assert_allclose(p.prob(torch.from_numpy(x)).numpy(), ref, rtol=1e-10, atol=1e-300)
    fine = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    assert torch.trapezoid(p.prob(fine), fine).item() == pytest.approx(1.0, abs=1e-6)
    assert p.prob(torch.tensor([-10.5, 10.5])).tolist() == [0.0, 0.0]
    assert torch.isfinite(p.log_prob(torch.tensor([10.0, -10.0]))).all()  # far tails: log density finite, not −inf
    assert p.mode() == pytest.approx(-2.5, abs=1e-3)
    w, (cold, hot) = S.toy_annotator_densities()
    assert w.tolist() == [0.4, 0.6]
    np.testing.assert_allclose(hot.prob(torch.from_numpy(x)).numpy(),
                               stats.truncnorm(-12.5, 7.5, loc=2.5, scale=1.0).pdf(x), rtol=1e-10, atol=1e-300)


def _binned_calibration(prob: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> None:
    """In each probability bin, the label frequency matches the mean probability within 5 SE."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (prob >= lo) & (prob < hi)
        n = int(sel.sum())
        if n < 50:
            continue
        p_mean = prob[sel].mean().item()
        freq = labels[sel].double().mean().item()
        se = math.sqrt(max(p_mean * (1 - p_mean), 1e-4) / n)
        assert abs(freq - p_mean) < 5 * se + 1e-3, f"bin [{lo:.1f}, {hi:.1f}): label freq {freq:.4f} vs prob {p_mean:.4f} (n={n})"


def test_luce_pairs_follow_the_luce_rule():
    d = S.sample_luce_pairs(200_000, gen(0))
    assert d.x_a.min() >= -10 and d.x_a.max() <= 10 and d.x_b.dtype == torch.float32
    assert abs(d.x_a.double().mean().item()) < 0.05 and d.x_b.double().var().item() == pytest.approx(400 / 12, rel=0.02)
    x_a, x_b = d.x_a[:500].double().numpy(), d.x_b[:500].double().numpy()

    def pdf(x):
        return sum(w * stats.truncnorm((-10 - m) / s, (10 - m) / s, loc=m, scale=s).pdf(x) for w, m, s in ((0.4, -2.5, 0.25), (0.6, 2.5, 1.0)))

    pa, pb = pdf(x_a), pdf(x_b)
    ok = (pa + pb) > 1e-200
    np.testing.assert_allclose(d.prob_a[:500].numpy()[ok], (pa / (pa + pb))[ok], rtol=1e-9, atol=1e-12)
    _binned_calibration(d.prob_a, d.labels)


def test_annotator_mixture_pairs_follow_eq_21():
    d = S.sample_annotator_mixture_pairs(200_000, gen(1))
    n = d.annotator.shape[0]
    frac_cold = (d.annotator == 0).double().mean().item()
    assert abs(frac_cold - 0.4) < 5 * math.sqrt(0.24 / n)
    _, (cold, hot) = S.toy_annotator_densities()
    for k, ann in enumerate((cold, hot)):
        sel = d.annotator == k
        own = S.luce_preference_probability(ann, d.x_a[sel].double(), d.x_b[sel].double())
        _binned_calibration(own, d.labels[sel])
    explicit = 0.4 * S.luce_preference_probability(cold, d.x_a.double(), d.x_b.double()) + 0.6 * S.luce_preference_probability(hot, d.x_a.double(), d.x_b.double())
    torch.testing.assert_close(d.prob_a, explicit)
    _binned_calibration(d.prob_a, d.labels)
    # The signature of eq. 21 (Fig. 4): cold-mode vs hot-mode pairs are won 40/60, not ~always.
    both = ((d.x_a + 2.5).abs() < 0.2) & ((d.x_b - 2.5).abs() < 0.3)
    assert d.prob_a[both].mean().item() == pytest.approx(0.4, abs=1e-3)


def test_pbde_pairs_follow_their_rule():
    g = gen(6)
    log_p = torch.randn(12, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 9, (12,), generator=g)
    offset = torch.randn(12, generator=g, dtype=torch.float64)
    d = S.sample_pbde_pairs(log_p, 100_000, g, f=1.0 / lengths, g=offset)
    assert d.a.min() >= 0 and d.a.max() <= 11 and d.a.dtype == torch.int64
    counts = torch.bincount(torch.cat([d.a, d.b]), minlength=12).double()
    assert ((counts - 2e5 / 12).abs() < 5 * math.sqrt(2e5 / 12)).all()  # uniform items
    # prob_a from eq. 11 written out: σ(Ω(a) − Ω(b)), Ω = log p/|x| + g.
    omega = log_p / lengths + offset
    torch.testing.assert_close(d.prob_a, 1 / (1 + torch.exp(omega[d.b] - omega[d.a])))
    _binned_calibration(d.prob_a, d.labels)
    luce = S.sample_pbde_pairs(log_p, 1000, gen(1))
    torch.testing.assert_close(luce.prob_a, torch.sigmoid(log_p[luce.a] - log_p[luce.b]))


# ---- world (b) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_world() -> S.RatingsWorld:
    return S.make_ratings_world(gen(5), S.RatingsWorldConfig(num_items=3000, num_annotators=10, min_annotators=6))


def test_ratings_world_structure(big_world):
    w = big_world
    b, n = w.scores.shape
    assert w.features.shape == (b, 4 + 6) and w.prompt_features.shape == (b, 4)
    assert w.attribute_scores.shape == (b, 2, n) and w.attribute_names == ("helpfulness", "safety")
    counts = w.mask.sum(1)
    assert counts.min() >= 6 and counts.max() <= 10
    assert torch.equal(w.mask, torch.arange(n)[None] < counts[:, None])  # valid slots come first
    assert (w.scores.abs() <= 1).all() and (w.attribute_scores.abs() <= 1).all()
    assert (w.scores[~w.mask] == 0).all() and (w.annotator_ids[~w.mask] == -1).all()
    for i in range(50):
        ids = w.annotator_ids[i][w.mask[i]]
        assert ids.unique().numel() == ids.numel(), "an item's annotators are distinct"
    valid = w.mask
    assert torch.equal(w.annotator_types[valid], w.pool_types[w.annotator_ids[valid]])
    torch.testing.assert_close(w.type_proportions, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    assert w.type_names == ("pragmatist", "enthusiast", "cautious")


@pytest.mark.parametrize("attribute", [None, "helpfulness", "safety"])
def test_true_cdf_and_mean_match_monte_carlo(big_world, attribute):
    w = big_world
    scores = w.scores if attribute is None else w.attribute_scores[:, w.attribute_names.index(attribute)]
    valid = w.mask
    n_valid = valid.sum(1).double()
    total = n_valid.sum().item()
    points = torch.tensor([-0.95, -0.7, -0.3, 0.0, 0.3, 0.6, 0.95], dtype=torch.float64)
    cdf = w.true_cdf(points, attribute)  # (B, G)
    expected = (cdf * n_valid[:, None]).sum(0) / total
    observed = torch.stack([((scores.double() <= x) & valid).sum() / total for x in points])
    se = torch.sqrt(expected * (1 - expected) / total)
    assert ((observed - expected).abs() <= 5 * se + 2e-3).all(), (observed, expected)
    mean_expected = (w.true_mean(attribute) * n_valid).sum().item() / total
    mean_observed = scores.double()[valid].mean().item()
    assert abs(mean_observed - mean_expected) < 5 * scores.double()[valid].std().item() / math.sqrt(total)


def test_ratings_are_type_mean_plus_gaussian_noise(big_world):
    # Per type: (score − μ_type(item)) / σ_type is standard normal where clipping cannot occur.
    w = big_world
    mix = w.true_score_mixture()
    for t in range(3):
        sel = w.mask & (w.annotator_types == t)
        rows = sel.nonzero()[:, 0]
        mu = mix.means[rows, t]
        sd = mix.stds[rows, t]
        z = ((w.scores[sel].double() - mu) / sd)[(mu.abs() + 5 * sd) < 1]
        assert z.numel() > 500
        assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_gmm_params_are_the_mixture_in_logit_form():
    w = S.make_ratings_world(gen(8), S.RatingsWorldConfig(num_items=6))
    mix = w.true_score_mixture("safety")
    logits, mu, log_sigma = mix.gmm_params()
    torch.testing.assert_close(torch.softmax(logits, -1), mix.weights)
    torch.testing.assert_close(log_sigma.exp(), mix.stds)
    assert torch.equal(mu, mix.means) and mu.shape == (6, 3)


def test_true_quantile_and_mean_match_scipy():
    w = S.make_ratings_world(gen(9), S.RatingsWorldConfig(num_items=12))
    mix = w.true_score_mixture()
    levels = torch.tensor([0.05, 0.25, 0.5, 0.9], dtype=torch.float64)
    q = w.true_quantile(levels)
    for i in range(12):
        wts, mus, sds = mix.weights[i].numpy(), mix.means[i].numpy(), mix.stds[i].numpy()

        def cdf(x):  # the clipped mixture: GMM CDF on (−1, 1)
            return float(np.sum(wts * stats.norm.cdf(x, mus, sds))) if x < 1 else 1.0

        for j, lev in enumerate(levels.tolist()):
            if cdf(-1.0) >= lev:  # an atom at −1 holds this level
                assert q[i, j].item() == pytest.approx(-1.0, abs=1e-9)
            else:
                ref = optimize.brentq(lambda x: cdf(x) - lev, -1.0, 1.0 - 1e-12, xtol=1e-13)
                assert q[i, j].item() == pytest.approx(ref, abs=1e-9)
        dens = lambda x: float(np.sum(wts * stats.norm.pdf(x, mus, sds)))  # noqa: E731
        mean_ref = -cdf(-1.0) + integrate.quad(lambda x: x * dens(x), -1, 1, epsabs=1e-13)[0] + (1 - float(np.sum(wts * stats.norm.cdf(1.0, mus, sds))))
        assert w.true_mean()[i].item() == pytest.approx(mean_ref, abs=1e-9)
        crr = float(np.sum(wts * stats.norm.cdf(-0.7, mus, sds)))
        assert w.true_catastrophic_rate()[i].item() == pytest.approx(crr, abs=1e-12)


def test_contentious_region_is_liked_on_average_but_has_a_catastrophic_tail(big_world):
    w = big_world
    c = w.contentious
    assert 0.15 < c.double().mean().item() < 0.35
    mean = w.true_mean()
    q10 = w.true_quantile(torch.tensor([0.1], dtype=torch.float64))[:, 0]
    crr = w.true_catastrophic_rate()
    assert mean[c].mean() > 0.1 and (mean[c] > 0).double().mean() > 0.7
    assert (q10[c] < -0.7).double().mean() > 0.9
    assert crr[c].mean() > 0.15 and crr[c].mean() > 2 * crr[~c].mean()
    # The data show the same: in contentious items the cautious minority rates below −0.7.
    sel = w.mask & c[:, None]
    cautious = sel & (w.annotator_types == 2)
    assert (w.scores[cautious] < -0.7).double().mean() > 0.9
    assert w.scores[sel].double().mean() > 0.1


def test_to_records_is_ratings_schema_and_round_trips_through_json():
    w = S.make_ratings_world(gen(2), S.RatingsWorldConfig(num_items=40, num_prompts=10))
    records = w.to_records()
    assert len(records) == 40
    for i, r in enumerate(records):
        assert set(r) == {"prompt", "response", "scores", "annotator_ids"}
        assert isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["response"], str) and r["response"]
        assert r["scores"] == w.scores[i][w.mask[i]].tolist()
        assert len(r["annotator_ids"]) == len(r["scores"]) == int(w.mask[i].sum())
        assert all(-1 <= s <= 1 for s in r["scores"])
        assert r["annotator_ids"] == [f"annotator-{a}" for a in w.annotator_ids[i][w.mask[i]].tolist()]
    # Items sharing a prompt id render the same prompt text.
    same = (w.prompt_ids == w.prompt_ids[0]).nonzero()[:, 0].tolist()
    assert len({records[i]["prompt"] for i in same}) == 1
    text = "\n".join(json.dumps(r) for r in records)
    assert [json.loads(line) for line in text.splitlines()] == records


def test_vote_pairs_match_the_population_preference():
    w = S.make_ratings_world(gen(3), S.RatingsWorldConfig(num_items=64))
    p = S.sample_vote_pairs(w, 30_000, 10, gen(4))
    assert p.votes.shape == (30_000, 10) and set(p.votes.unique().tolist()) <= {0, 1}
    # Each vote and the label are Bernoulli(prob_a): calibrated per bin.
    _binned_calibration(p.prob_a, p.label)
    _binned_calibration(p.prob_a.repeat_interleave(10), p.votes.flatten().bool())
    # prob_a is Σ_t w_t Φ((μ_t(a) − μ_t(b)) / (σ_t √2)) from the type means, checked with scipy.
    wa = S.RatingsWorld(**{**w.__dict__, "prompt_features": p.prompt_features[:20], "response_features": p.response_a[:20]})
    wb = S.RatingsWorld(**{**w.__dict__, "prompt_features": p.prompt_features[:20], "response_features": p.response_b[:20]})
    ma, mb = wa.true_score_mixture(), wb.true_score_mixture()
    ref = (ma.weights.numpy() * stats.norm.cdf(((ma.means - mb.means) / (ma.stds * math.sqrt(2))).numpy())).sum(1)
    np.testing.assert_allclose(p.prob_a[:20].numpy(), ref, rtol=1e-10)
    records = p.to_records()
    for i in range(20):
        r = records[i]
        assert set(r) == {"prompt", "chosen", "rejected", "votes"}
        # Votes are re-coded to "preferred the chosen response".
        expected = p.votes[i] if bool(p.label[i]) else 1 - p.votes[i]
        assert r["votes"] == expected.tolist()
        assert r["chosen"] != r["rejected"]
        assert r["prompt"] == w.to_records()[int(p.prompt_ids[i])]["prompt"]  # same prompt text as the world's item


# ---- errors ------------------------------------------------------------------------------

def _types_with_shares(*shares: float) -> tuple[S.AnnotatorType, ...]:
    return tuple(dataclasses.replace(t, proportion=p) for t, p in zip(S.default_annotator_types(), shares))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: S.sample_luce_pairs(10, 0), TypeError, "generator must be a torch.Generator"),
        (lambda: S.sample_luce_pairs(-1, gen(0)), ValueError, r"n must be an int >= 0, got -1"),
        (lambda: S.sample_annotator_mixture_pairs(5, gen(0), weights=torch.tensor([0.5, 0.5])), ValueError, "weights and annotators must be given together"),
        (lambda: S.sample_annotator_mixture_pairs(5, gen(0), torch.tensor([0.5, 0.6]), S.toy_annotator_densities()[1]), ValueError, "weights must be positive, sum to 1"),
        (lambda: S.sample_pbde_pairs(torch.zeros(3), 5, gen(0), f=torch.tensor([1.0, 0.0, 1.0])), ValueError, r"f must be a tensor of shape \(X,\) = \(3,\) with every value > 0"),
        (lambda: S.sample_pbde_pairs(torch.tensor([0.0, -math.inf]), 5, gen(0)), ValueError, "log_p must be finite"),
        (lambda: S.sample_pbde_pairs(torch.zeros(2, 2), 5, gen(0)), ValueError, r"log_p must be a floating tensor of shape \(X,\)"),
        (lambda: S.sample_pbde_pairs(torch.zeros(3), 5, gen(0), g=torch.zeros(2)), ValueError, r"g must be a tensor of shape \(X,\) = \(3,\)"),
        (lambda: S.TruncatedNormalMixture(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([-1.0])), ValueError, "weights and stds must be > 0"),
        (lambda: S.RatingsWorldConfig(num_annotators=5, min_annotators=6), ValueError, r"min_annotators must be <= num_annotators \(5\), got 6"),
        (lambda: S.RatingsWorldConfig(response_dim=2), ValueError, r"response_dim must be an int >= 3, got 2"),
        (lambda: S.RatingsWorldConfig(pool_size=5, num_annotators=10), ValueError, r"pool_size must be >= num_annotators \(10\), got 5"),
        (lambda: S.make_ratings_world(gen(0), S.RatingsWorldConfig(pool_size=10, num_annotators=3, min_annotators=2), _types_with_shares(0.98, 0.01, 0.01)),
         ValueError, r"pool_size 10 is too small: some annotator type gets no member \(counts \[10, 0, 0\]\)"),
        (lambda: S.make_ratings_world(None), TypeError, "generator must be a torch.Generator"),
        (lambda: S.make_ratings_world(gen(0), S.RatingsWorldConfig(num_items=4)).true_quantile(torch.tensor([0.0, 0.5])), ValueError, r"levels must be a 1-D tensor of values strictly inside \(0, 1\)"),
        (lambda: S.make_ratings_world(gen(0), S.RatingsWorldConfig(num_items=4)).true_cdf(torch.zeros(3), "honesty"), ValueError, r"attribute must be None, 'overall' or one of \('helpfulness', 'safety'\), got 'honesty'"),
        (lambda: S.sample_vote_pairs(S.make_ratings_world(gen(0), S.RatingsWorldConfig(num_items=4)), 3, 100, gen(1)), ValueError, r"num_votes must be < pool size \(100\)"),
        (lambda: S.sample_vote_pairs(S.make_ratings_world(gen(0), S.RatingsWorldConfig(num_items=4)), 3, 0, gen(1)), ValueError, r"num_votes must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
