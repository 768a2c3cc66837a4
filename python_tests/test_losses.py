"""Unit tests of prefcore.losses against explicit formulas written out here in float64
(plain ``log(1/(1+exp(-z)))``, python loops), not against the code under test.

Tolerances: float64 results match the float64 formula to 1e-12; float32 to 1e-6 (rel);
bfloat16/float16 to the formula evaluated on the same rounded inputs within 2e-2 / 4e-3 (rel),
i.e. the output rounding of that dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prefcore.losses import (
    LatentAnnotatorMixture,
    bradley_terry_loss,
    dpo_loss,
    latent_mixture_em_step,
    latent_mixture_log_likelihoods,
    latent_mixture_nll,
    latent_mixture_preference,
    latent_mixture_responsibilities,
    length_normalized_luce_loss,
    luce_loss,
    pbde_loss,
    vote_margin,
    weighted_bradley_terry_loss,
)
from python_tests.helpers import DEVICES

DTYPE_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
SHAPES = [(0,), (1,), (7,), (3, 5)]


def nll_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """−log σ(z) straight from the definition (fine for |z| < 30 in float64)."""
    return -torch.log(1.0 / (1.0 + torch.exp(-z)))


def reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return x
    if reduction == "sum":
        return x.sum()
    return x.sum() / max(x.numel(), 1)


def _pair(shape, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return a, b


# ---- Bradley–Terry -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
def test_bradley_terry_matches_formula(shape, dtype, reduction, margin_kind):
    rc, rr = _pair(shape, dtype)
    margin = {"none": None, "float": 0.3, "tensor": torch.rand(shape, dtype=torch.float64).to(dtype)}[margin_kind]
    out = bradley_terry_loss(rc, rr, margin, reduction=reduction)
    m = 0.0 if margin is None else (margin.double() if isinstance(margin, torch.Tensor) else margin)
    expected = reduce(nll_sigmoid(rc.double() - rr.double() - m), reduction)
    assert out.dtype == dtype
    assert out.shape == (shape if reduction == "none" else ())
    torch.testing.assert_close(out.double(), expected, **DTYPE_TOL[dtype])


def test_bradley_terry_empty_mean_is_zero_not_nan():
    e = torch.zeros(0, requires_grad=True)
    out = bradley_terry_loss(e, torch.zeros(0))
    assert out.item() == 0.0
    out.backward()
    assert e.grad.shape == (0,)


def test_bradley_terry_gradient_matches_formula():
    rc, rr = _pair((6,))
    m = torch.rand(6, dtype=torch.float64)
    rc.requires_grad_()
    rr.requires_grad_()
    g = torch.autograd.grad(bradley_terry_loss(rc, rr, m, reduction="sum"), (rc, rr))
    # d/dz softplus(−z) = −σ(−z), z = r_c − r_r − m.
    s = 1.0 / (1.0 + torch.exp(rc.detach() - rr.detach() - m))
    torch.testing.assert_close(g[0], -s)
    torch.testing.assert_close(g[1], s)
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry_loss(a, b, m, reduction="none"), (rc, rr))


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e4), (torch.float64, 1e30), (torch.bfloat16, 1e4), (torch.float16, 3e4)])
def test_bradley_terry_extreme_logits_finite(dtype, big):
    rc = torch.tensor([big, -big, 0.0, big], dtype=dtype, requires_grad=True)
    rr = torch.tensor([-big, big, 0.0, big], dtype=dtype)
    out = bradley_terry_loss(rc, rr, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), rc)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    # Right answer, not merely finite: 0 when the chosen wins by far, the gap when it loses by far.
    assert out[0].item() == 0.0
    assert out[1].double().item() == pytest.approx(2 * big, rel=1e-2)
    assert out[2].double().item() == pytest.approx(math.log(2), rel=1e-2)
    assert g[1].item() == pytest.approx(-1.0) and g[0].item() == pytest.approx(0.0, abs=1e-30)


def test_margin_bt_demands_larger_gap():
    # With margin m the loss of a pair equals the plain loss of a pair whose gap is smaller by m,
    # so the same gap is penalised more.
    rc, rr = _pair((9,))
    m = torch.rand(9, dtype=torch.float64)
    torch.testing.assert_close(bradley_terry_loss(rc, rr, m, reduction="none"), nll_sigmoid(rc - m - rr))
    assert (bradley_terry_loss(rc, rr, m, reduction="none") > bradley_terry_loss(rc, rr, reduction="none")).all()


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(4), torch.zeros(4, 1)), r"r_rejected must have the shape of r_chosen \(4,\), got \(4, 1\)"),
        ((torch.zeros(4), torch.zeros(3)), r"r_rejected must have the shape of r_chosen \(4,\), got \(3,\)"),
        ((torch.zeros(4, dtype=torch.long), torch.zeros(4)), r"r_chosen must be a floating tensor"),
        ((torch.zeros(4), torch.zeros(4), torch.zeros(3)), r"margin must be a number or a tensor with the shape of r_chosen \(4,\), got \(3,\)"),
        ((torch.zeros(4), torch.zeros(4), float("nan")), r"margin must be finite"),
        ((torch.zeros(4), torch.zeros(4), "1"), r"margin must be a float"),
    ],
)
def test_bradley_terry_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        bradley_terry_loss(*args)


def test_bradley_terry_bad_reduction_and_type():
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(TypeError, match="r_chosen must be a torch.Tensor, got list"):
        bradley_terry_loss([0.0, 1.0], torch.zeros(2))


# ---- vote margin -------------------------------------------------------------------------

def _margin_loop(votes: list[list[int]], mask: list[list[bool]] | None = None) -> list[float]:
    out = []
    for i, row in enumerate(votes):
        valid = [v for j, v in enumerate(row) if mask is None or mask[i][j]]
        n = len(valid)
        out.append(abs(sum(valid) - n / 2) / (n / 2))
    return out


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.float32, torch.float64])
def test_vote_margin_matches_formula(dtype):
    votes = [[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    out = vote_margin(torch.tensor(votes).to(dtype))
    assert out.shape == (5,)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), torch.tensor([1.0, 0.0, 0.5, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out.double(), torch.tensor(_margin_loop(votes), dtype=torch.float64))


def test_vote_margin_with_mask_and_odd_counts():
    g = torch.Generator().manual_seed(3)
    votes = (torch.rand(40, 9, generator=g) > 0.4).long()
    mask = torch.rand(40, 9, generator=g) > 0.3
    mask[:, 0] = True
    votes_with_junk = torch.where(mask, votes, torch.full_like(votes, 7))  # masked-out values are ignored
    out = vote_margin(votes_with_junk, mask)
    torch.testing.assert_close(out.double(), torch.tensor(_margin_loop(votes.tolist(), mask.tolist()), dtype=torch.float64))
    # Three valid votes 1, 1, 0: |2 − 1.5| / 1.5 = 1/3.
    one = vote_margin(torch.tensor([[1, 1, 0, 1]]), torch.tensor([[True, True, True, False]]))
    assert one.item() == pytest.approx(1 / 3)
    assert vote_margin(torch.zeros(0, 3)).shape == (0,)


@pytest.mark.parametrize(
    "votes,mask,match",
    [
        (torch.tensor([[1, 2, 0]]), None, r"votes must be 0 or 1, got 2 at votes\[0, 1\]"),
        (torch.tensor([[1.0, 0.5]]), None, r"votes must be 0 or 1, got 0.5 at votes\[0, 1\]"),
        (torch.tensor([[0, 1], [1, -1]]), None, r"votes must be 0 or 1, got -1 at votes\[1, 1\]"),
        (torch.tensor([1, 0, 1]), None, r"votes must have shape \(B, n\), got \(3,\)"),
        (torch.tensor([[1, 0]]), torch.tensor([[True]]), r"mask must have the shape of votes \(1, 2\), got \(1, 1\)"),
        (torch.tensor([[1, 0]]), torch.tensor([[1, 0]]), r"mask must be a bool tensor, got torch.int64"),
        (torch.tensor([[1, 0], [1, 1]]), torch.tensor([[True, True], [False, False]]), r"row 1 has none"),
    ],
)
def test_vote_margin_bad_inputs(votes, mask, match):
    with pytest.raises(ValueError, match=match):
        vote_margin(votes, mask)


# ---- PBDE family -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_pbde_matches_formula(shape, reduction):
    lc, lr = _pair(shape, scale=5.0)
    lc, lr = -lc.abs(), -lr.abs()  # log-likelihoods
    g = torch.Generator().manual_seed(1)
    f_c = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    f_r = torch.randint(1, 5, shape, generator=g)  # integer f is allowed
    g_c = torch.randn(shape, generator=g, dtype=torch.float64)
    out = pbde_loss(lc, lr, f_chosen=f_c, f_rejected=f_r, g_chosen=g_c, g_rejected=-0.4, reduction=reduction)
    expected = nll_sigmoid((f_c * lc + g_c) - (f_r.double() * lr - 0.4))
    torch.testing.assert_close(out, reduce(expected, reduction), rtol=1e-12, atol=1e-12)


def test_luce_is_bt_on_log_likelihoods_and_pbde_default():
    lc, lr = _pair((11,))
    torch.testing.assert_close(luce_loss(lc, lr, reduction="none"), nll_sigmoid(lc - lr))
    torch.testing.assert_close(pbde_loss(lc, lr), bradley_terry_loss(lc, lr))


@pytest.mark.parametrize("int_lengths", [True, False])
def test_length_normalized_luce_matches_formula(int_lengths):
    lc, lr = _pair((8,), scale=20.0)
    lc, lr = -lc.abs(), -lr.abs()
    g = torch.Generator().manual_seed(2)
    len_c = torch.randint(1, 60, (8,), generator=g)
    len_r = torch.randint(1, 60, (8,), generator=g)
    if not int_lengths:
        len_c, len_r = len_c.double(), len_r.double()
    out = length_normalized_luce_loss(lc, lr, len_c, len_r, reduction="none")
    expected = nll_sigmoid(lc / len_c.double() - lr / len_r.double())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Eq. 12 as written: p_c^(1/|c|) / (p_c^(1/|c|) + p_r^(1/|r|)).
    pc, pr = lc.exp() ** (1 / len_c.double()), lr.exp() ** (1 / len_r.double())
    torch.testing.assert_close(out, -torch.log(pc / (pc + pr)), rtol=1e-10, atol=1e-10)
    # Scalar lengths broadcast as constants.
    torch.testing.assert_close(length_normalized_luce_loss(lc, lr, 4, 2.0, reduction="none"), nll_sigmoid(lc / 4 - lr / 2))


def test_length_normalization_removes_length_bias():
    # Two responses with the same per-token log-likelihood: raw Luce prefers the short one
    # (loss for choosing the long one is high), the normalised rule is indifferent (log 2).
    per_token = torch.tensor([-2.0], dtype=torch.float64)
    long_lp, short_lp = per_token * 40, per_token * 5
    assert luce_loss(long_lp, short_lp).item() > 60
    assert length_normalized_luce_loss(long_lp, short_lp, 40, 5).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("beta", [0.05, 1.0, 8.0])
def test_dpo_equals_usual_dpo_formula(reduction, beta):
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-(torch.rand(10, generator=g, dtype=torch.float64) * 80) for _ in range(4))
    pc.requires_grad_()
    pr.requires_grad_()
    out = dpo_loss(pc, pr, rc, rr, beta, reduction=reduction)
    # Rafailov et al. (2023): −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]).
    logits = beta * ((pc - rc) - (pr - rr))
    usual = reduce(-torch.nn.functional.logsigmoid(logits), reduction)
    torch.testing.assert_close(out, usual, rtol=1e-12, atol=1e-12)
    g_out = torch.autograd.grad(out.sum(), (pc, pr))
    g_usual = torch.autograd.grad(usual.sum(), (pc, pr))
    torch.testing.assert_close(g_out, g_usual, rtol=1e-12, atol=1e-12)


def test_pbde_losses_finite_at_extreme_log_likelihoods():
    lc = torch.tensor([-1e4, -1.0, -1e4], requires_grad=True)
    lr = torch.tensor([-1.0, -1e4, -1e4])
    for loss in (
        luce_loss(lc, lr, reduction="none"),
        length_normalized_luce_loss(lc, lr, torch.tensor([1, 1, 1]), torch.tensor([1000, 1000, 1])),
        dpo_loss(lc, lr, torch.zeros(3), torch.zeros(3), 50.0, reduction="none"),
    ):
        (g,) = torch.autograd.grad(loss.sum(), lc)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert luce_loss(lc, lr, reduction="none")[0].item() == pytest.approx(1e4 - 1, rel=1e-6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: length_normalized_luce_loss(torch.zeros(3), torch.zeros(3), torch.tensor([1, -2, 3]), torch.ones(3)),
         ValueError, r"len_chosen must be > 0 everywhere, got a value -2"),
        (lambda: length_normalized_luce_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.tensor([1.0, 0.0, 1.0])),
         ValueError, r"len_rejected must be > 0 everywhere, got a value 0.0"),
        (lambda: length_normalized_luce_loss(torch.zeros(3), torch.zeros(3), -1, 1), ValueError, r"len_chosen must be > 0, got -1.0"),
        (lambda: length_normalized_luce_loss(torch.zeros(3), torch.zeros(3), torch.ones(2), torch.ones(3)),
         ValueError, r"len_chosen must be a number or a tensor with the shape of logp_chosen \(3,\), got \(2,\)"),
        (lambda: length_normalized_luce_loss(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.ones(3)),
         ValueError, r"len_chosen must be a floating or integer tensor"),
        (lambda: dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0), ValueError, r"beta must be > 0, got 0.0"),
        (lambda: dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), -0.1), ValueError, r"beta must be > 0, got -0.1"),
        (lambda: dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), float("inf")), ValueError, r"beta must be finite"),
        (lambda: dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), torch.zeros(3), 0.1),
         ValueError, r"ref_logp_chosen must have the shape of policy_logp_chosen \(3,\), got \(4,\)"),
        (lambda: dpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3), 0.1),
         ValueError, r"policy_logp_rejected must have the shape of policy_logp_chosen \(3,\), got \(2,\)"),
        (lambda: pbde_loss(torch.zeros(3), torch.zeros(3), f_chosen=0.0), ValueError, r"f_chosen must be > 0, got 0.0"),
        (lambda: pbde_loss(torch.zeros(3), torch.zeros(3), f_rejected=torch.tensor([1.0, -1.0, 1.0])),
         ValueError, r"f_rejected must be > 0 everywhere"),
        (lambda: pbde_loss(torch.zeros(3), torch.zeros(3), g_chosen=torch.zeros(3, dtype=torch.long)),
         ValueError, r"g_chosen must be a floating tensor or a number"),
        (lambda: luce_loss(torch.zeros(2, 3), torch.zeros(3, 2)), ValueError, r"logp_rejected must have the shape of logp_chosen \(2, 3\), got \(3, 2\)"),
        (lambda: luce_loss(torch.zeros(3), torch.zeros(3), reduction=None), ValueError, r"reduction must be one of"),
    ],
)
def test_pbde_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- latent annotator mixture: functional pieces -----------------------------------------

def _mixture_inputs(b=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ra = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    rb = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    labels = torch.rand(b, generator=g) > 0.5
    log_w = torch.randn(k, generator=g, dtype=torch.float64)
    return ra, rb, labels, log_w


def _explicit_mixture(ra, rb, labels, log_w):
    """P(y_i | k) and π from the definitions, float64."""
    pi = torch.exp(log_w) / torch.exp(log_w).sum()
    p_a = 1.0 / (1.0 + torch.exp(-(ra - rb)))
    p_y = torch.where(labels[:, None], p_a, 1.0 - p_a)
    return pi, p_y


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_latent_mixture_nll_and_responsibilities_match_definitions(reduction):
    ra, rb, labels, log_w = _mixture_inputs()
    pi, p_y = _explicit_mixture(ra, rb, labels, log_w)
    torch.testing.assert_close(latent_mixture_log_likelihoods(ra, rb, labels), torch.log(p_y))
    nll = latent_mixture_nll(ra, rb, labels, log_w, reduction=reduction)
    torch.testing.assert_close(nll, reduce(-torch.log((pi * p_y).sum(1)), reduction))
    resp = latent_mixture_responsibilities(ra, rb, labels, log_w)
    torch.testing.assert_close(resp, pi * p_y / (pi * p_y).sum(1, keepdim=True))
    torch.testing.assert_close(latent_mixture_preference(ra, rb, log_w), (pi * 1 / (1 + torch.exp(rb - ra))).sum(1))
    w = weighted_bradley_terry_loss(ra, rb, labels, resp, reduction=reduction)
    torch.testing.assert_close(w, reduce(-(resp * torch.log(p_y)).sum(1), reduction))


def test_latent_mixture_with_one_annotator_is_bradley_terry():
    ra, rb, labels, _ = _mixture_inputs(k=1)
    rc, rr = torch.where(labels[:, None], ra, rb)[:, 0], torch.where(labels[:, None], rb, ra)[:, 0]
    torch.testing.assert_close(latent_mixture_nll(ra, rb, labels, torch.zeros(1), reduction="none"),
                               bradley_terry_loss(rc, rr, reduction="none"))


def test_em_objective_gradient_equals_observed_likelihood_gradient():
    # The EM identity: at the current parameters, ∇ Σ_i log Σ_k π_k p_ik = Σ_i Σ_k γ_ik ∇ log p_ik,
    # so the M-step's weighted BT loss climbs the observed likelihood.
    ra, rb, labels, log_w = _mixture_inputs(b=20, k=2, seed=4)
    ra.requires_grad_()
    rb.requires_grad_()
    resp = latent_mixture_responsibilities(ra, rb, labels, log_w)
    g_em = torch.autograd.grad(weighted_bradley_terry_loss(ra, rb, labels, resp, reduction="sum"), (ra, rb))
    g_obs = torch.autograd.grad(latent_mixture_nll(ra, rb, labels, log_w, reduction="sum"), (ra, rb))
    torch.testing.assert_close(g_em, g_obs)


def test_latent_mixture_extreme_rewards_finite():
    ra = torch.tensor([[1e4, -1e4], [-1e4, -1e4], [0.0, 3e4]], requires_grad=True)
    rb = torch.tensor([[-1e4, 1e4], [1e4, 1e4], [0.0, -3e4]])
    labels = torch.tensor([True, True, False])
    nll = latent_mixture_nll(ra, rb, labels, torch.zeros(2), reduction="none")
    (g,) = torch.autograd.grad(nll.sum(), ra)
    resp = latent_mixture_responsibilities(ra, rb, labels, torch.zeros(2))
    assert torch.isfinite(nll).all() and torch.isfinite(g).all() and torch.isfinite(resp).all()
    assert nll[0].item() == pytest.approx(math.log(2), rel=1e-5)  # one annotator certain, one impossible
    assert nll[1].item() == pytest.approx(2e4, rel=1e-5)            # both annotators certain of the other item
    torch.testing.assert_close(resp[0], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: latent_mixture_nll(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([1, 0, 2]), torch.zeros(2)),
         r"labels must be 0 or 1 \(1 = a preferred over b\), got 2 at labels\[2\]"),
        (lambda: latent_mixture_nll(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([1, 0]), torch.zeros(2)),
         r"labels must have shape \(B,\) = \(3,\), got \(2,\)"),
        (lambda: latent_mixture_nll(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3), torch.zeros(3)),
         r"log_weights must have shape \(K,\) = \(2,\) to match the rewards, got \(3,\)"),
        (lambda: latent_mixture_nll(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.zeros(1)),
         r"rewards_a must have shape \(B, K\) with K >= 1, got \(3,\)"),
        (lambda: latent_mixture_nll(torch.zeros(3, 2), torch.zeros(3, 3), torch.ones(3), torch.zeros(2)),
         r"rewards_b must have the shape of rewards_a \(3, 2\), got \(3, 3\)"),
        (lambda: weighted_bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3), torch.ones(3, 1)),
         r"responsibilities must have shape \(B, K\) = \(3, 2\), got \(3, 1\)"),
    ],
)
def test_latent_mixture_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- latent annotator mixture: the module and its EM -------------------------------------

class FixedRewards(nn.Module):
    """Rewards from a fixed table indexed by item id (no parameters that EM could move
    except a dummy one, so the weight update can be checked in isolation)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x] + 0.0 * self.dummy


def test_em_weight_update_converges_to_weight_mle():
    # With the rewards held fixed (lr = 0), EM only updates π; the observed log-likelihood is
    # concave in π, so EM must reach the maximiser found independently by projected search.
    g = torch.Generator().manual_seed(7)
    items = 30
    table = torch.randn(items, 2, generator=g) * 3
    x_a = torch.randint(0, items, (400,), generator=g)
    x_b = torch.randint(0, items, (400,), generator=g)
    p_a = 0.25 * torch.sigmoid(table[x_a, 0] - table[x_b, 0]) + 0.75 * torch.sigmoid(table[x_a, 1] - table[x_b, 1])
    labels = torch.rand(400, generator=g) < p_a
    mix = LatentAnnotatorMixture(FixedRewards(table), 2, min_weight=0.0)
    opt = torch.optim.SGD(mix.parameters(), lr=0.0)
    hist = mix.fit(x_a, x_b, labels, opt, em_iters=200, m_steps=1)
    assert all(b <= a + 1e-6 for a, b in zip(hist.nll, hist.nll[1:])), "EM on π must not increase the NLL"
    p_y = torch.where(labels[:, None], torch.sigmoid(table[x_a] - table[x_b]), torch.sigmoid(table[x_b] - table[x_a])).double()
    w1 = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    ll = torch.log(p_y[:, :1] * w1 + p_y[:, 1:] * (1 - w1)).sum(0)
    assert mix.weights[0].item() == pytest.approx(w1[ll.argmax()].item(), abs=2e-3)


class DictRewardModel(nn.Module):
    """A reward model that takes a mapping of tensors (like tokenizer output) and returns (B, K)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, k)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(batch["features"] * batch["scale"][:, None])


def test_mixture_module_accepts_mapping_inputs_and_matches_functional():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    xa = {"features": torch.randn(16, 3, generator=g), "scale": torch.rand(16, generator=g)}
    xb = {"features": torch.randn(16, 3, generator=g), "scale": torch.rand(16, generator=g)}
    labels = torch.rand(16, generator=g) > 0.5
    mix = LatentAnnotatorMixture(DictRewardModel(2), 2, weights=torch.tensor([0.3, 0.7]))
    ra, rb = mix.reward_model(xa), mix.reward_model(xb)
    torch.testing.assert_close(mix.weights, torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(mix.nll(xa, xb, labels), latent_mixture_nll(ra, rb, labels, torch.log(torch.tensor([0.3, 0.7]))))
    torch.testing.assert_close(mix(xa, xb), latent_mixture_preference(ra, rb, torch.log(torch.tensor([0.3, 0.7]))))
    opt = torch.optim.Adam(mix.parameters(), lr=0.05)
    before = mix.nll(xa, xb, labels).item()
    for _ in range(30):
        latent_mixture_em_step(mix, xa, xb, labels, opt, m_steps=2, batch_size=8, generator=g)
    assert mix.nll(xa, xb, labels).item() < before


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: m.nll(torch.zeros(4, 1), torch.zeros(3, 1), torch.ones(4)), ValueError, r"x_b must have the batch size of x_a \(4\), got 3"),
        (lambda m: m.em_step(torch.zeros(4, 1), torch.zeros(4, 1), torch.ones(3), torch.optim.SGD(m.parameters(), lr=0.1)),
         ValueError, r"labels must have shape \(B,\) = \(4,\), got \(3,\)"),
        (lambda m: m.em_step(torch.zeros(4, 1), torch.zeros(4, 1), torch.ones(4), torch.optim.SGD(m.parameters(), lr=0.1), m_steps=0),
         ValueError, r"m_steps must be an int >= 1, got 0"),
        (lambda m: m.em_step(torch.zeros(4, 1), torch.zeros(4, 1), torch.ones(4), torch.optim.SGD(m.parameters(), lr=0.1), batch_size=0),
         ValueError, r"batch_size must be None or an int >= 1, got 0"),
        (lambda m: m.nll(torch.zeros(4, 1), torch.zeros(4, 1), torch.full((4,), 3.0)), ValueError, r"labels must be 0 or 1"),
        (lambda m: m.nll([0.0], [1.0], torch.ones(1)), TypeError, r"x_a must be a tensor or a non-empty mapping of batch-first tensors, got list"),
    ],
)
def test_mixture_module_bad_inputs(call, exc, match):
    mix = LatentAnnotatorMixture(nn.Linear(1, 2), 2)
    with pytest.raises(exc, match=match):
        call(mix)


def test_mixture_module_bad_construction_and_reward_shape():
    with pytest.raises(ValueError, match=r"num_annotators must be an int >= 1, got 0"):
        LatentAnnotatorMixture(nn.Linear(1, 2), 0)
    with pytest.raises(ValueError, match=r"min_weight must be in \[0, 1/K\)"):
        LatentAnnotatorMixture(nn.Linear(1, 2), 2, min_weight=0.5)
    with pytest.raises(ValueError, match=r"weights must be a positive tensor of shape \(K,\) = \(2,\)"):
        LatentAnnotatorMixture(nn.Linear(1, 2), 2, weights=torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="reward_model must be a torch.nn.Module"):
        LatentAnnotatorMixture(lambda x: x, 2)
    wrong = LatentAnnotatorMixture(nn.Linear(1, 3), 2)
    with pytest.raises(ValueError, match=r"reward_model must return rewards of shape \(B, K\) = \(4, 2\), got \(4, 3\)"):
        wrong.nll(torch.zeros(4, 1), torch.zeros(4, 1), torch.ones(4))


# ---- devices -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_losses_on_device_match_cpu(device):
    rc, rr = _pair((33,))
    votes = torch.rand(33, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    m = vote_margin(votes.to(device))
    assert m.device.type == torch.device(device).type
    torch.testing.assert_close(m.cpu(), vote_margin(votes))
    dev = lambda t: t.to(device)  # noqa: E731
    torch.testing.assert_close(bradley_terry_loss(dev(rc), dev(rr), m.double()).cpu(), bradley_terry_loss(rc, rr, m.cpu().double()))
    lens = torch.randint(1, 9, (33,))
    torch.testing.assert_close(length_normalized_luce_loss(dev(rc), dev(rr), dev(lens), dev(lens + 1)).cpu(),
                               length_normalized_luce_loss(rc, rr, lens, lens + 1))
    torch.testing.assert_close(dpo_loss(dev(rc), dev(rr), dev(rr), dev(rc), 0.5).cpu(), dpo_loss(rc, rr, rr, rc, 0.5))
    ra, rb, labels, log_w = _mixture_inputs()
    torch.testing.assert_close(latent_mixture_nll(dev(ra), dev(rb), dev(labels), dev(log_w)).cpu(),
                               latent_mixture_nll(ra, rb, labels, log_w))
    # The module and its EM step run where the reward model lives.
    torch.manual_seed(0)
    mix = LatentAnnotatorMixture(nn.Linear(2, 2), 2).to(device)
    xa, xb = torch.randn(64, 2, device=device), torch.randn(64, 2, device=device)
    y = (torch.rand(64) > 0.5).to(device)
    opt = torch.optim.SGD(mix.parameters(), lr=0.1)
    nll = mix.em_step(xa, xb, y, opt, m_steps=3, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(nll) and mix.weights.device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_device_mismatch_is_a_clear_error(device):
    if device == "cpu":
        other = torch.zeros(3, device="meta")
    else:
        other = torch.zeros(3)
    with pytest.raises(ValueError, match="margin must be on the same device as r_chosen"):
        bradley_terry_loss(torch.zeros(3, device=device), torch.zeros(3, device=device), other)
