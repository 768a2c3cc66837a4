"""prefcore.models heads and gating network against closed forms and plain-PyTorch maths.

Each head's output is recomputed here from its own weights with independent formulas (matmul,
softplus/cumsum loops, a hand-written MLP, scipy's normal quantiles); tolerances are fp32
rounding (1e-6 abs) unless stated.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from prefcore.models import (
    GatingNetwork,
    GatingNetworkConfig,
    GMMHead,
    GMMHeadConfig,
    MeanVarianceHead,
    MixtureParams,
    QuantileHead,
    QuantileHeadConfig,
    ScalarHead,
    build_head,
    default_taus,
    head_config_from_dict,
    head_config_to_dict,
)

D = 12


def _randomize(module: torch.nn.Module, scale: float = 1.0) -> None:
    """Give every parameter large random values (so no test depends on the initialisation)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)


# ---- quantile head ---------------------------------------------------------------------------

def test_default_taus_are_qrm_levels():
    taus = default_taus()
    np.testing.assert_allclose(taus, np.linspace(0.05, 0.95, 19), rtol=0, atol=1e-12)
    assert taus[2] == 0.15 and taus[-1] == 0.95
    head = QuantileHead(D)
    assert head.taus.dtype == torch.float32 and head.taus.shape == (19,)
    torch.testing.assert_close(head.taus, torch.linspace(0.05, 0.95, 19), rtol=0, atol=1e-7)
    assert "taus" in head.state_dict()  # a buffer, saved with the weights
    head = head.to(torch.bfloat16)
    assert head.linear.weight.dtype == torch.bfloat16 and head.taus.dtype == torch.float32
    assert head.taus.tolist() == torch.tensor(taus, dtype=torch.float32).tolist()  # not rounded to bf16


@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_quantile_head_is_linear(lead):
    head = QuantileHead(D, num_attributes=3, taus=[0.1, 0.5, 0.9])
    _randomize(head)
    h = torch.randn(*lead, D)
    out = head(h)
    assert out.shape == (*lead, 3, 3)
    w, b = head.linear.weight, head.linear.bias
    expect = (h.double() @ w.double().T + b.double()).reshape(*lead, 3, 3)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_crossing_is_monotone(dtype):
    torch.manual_seed(1)
    head = QuantileHead(D, num_attributes=4, non_crossing=True).to(dtype)
    plain = QuantileHead(D, num_attributes=4).to(dtype)
    _randomize(head, 3.0)
    _randomize(plain, 3.0)
    h = (torch.randn(256, D) * 10).to(dtype)
    out, out_plain = head(h), plain(h)
    assert out.shape == (256, 4, 19) and out.dtype == dtype
    assert (out.diff(dim=-1) >= 0).all(), "non-crossing quantiles decreased somewhere"
    # the property is not free: the same random weights without the parametrisation do cross
    assert (out_plain.diff(dim=-1) < 0).any()


def test_non_crossing_formula():
    head = QuantileHead(D, num_attributes=2, taus=[0.2, 0.4, 0.6, 0.8], non_crossing=True).double()
    _randomize(head)
    h = torch.randn(7, D, dtype=torch.float64)
    raw = (h @ head.linear.weight.T + head.linear.bias).reshape(7, 2, 4)
    expect = torch.empty_like(raw)
    for m in range(2):
        acc = raw[:, m, 0].clone()
        expect[:, m, 0] = acc
        for q in range(1, 4):
            acc = acc + torch.log1p(torch.exp(raw[:, m, q]))  # softplus, written out
            expect[:, m, q] = acc
    torch.testing.assert_close(head(h), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("non_crossing", [False, True])
def test_quantile_head_starts_at_standard_normal_quantiles(non_crossing):
    head = QuantileHead(D, num_attributes=2, non_crossing=non_crossing)
    out = head(torch.zeros(1, D))
    expect = torch.tensor(norm.ppf(np.linspace(0.05, 0.95, 19)), dtype=torch.float32).expand(1, 2, 19)
    torch.testing.assert_close(out, expect, rtol=0, atol=2e-5)


def test_quantile_head_single_quantile_non_crossing():
    head = QuantileHead(D, taus=[0.5], non_crossing=True)
    h = torch.randn(3, D)
    torch.testing.assert_close(head(h)[:, 0, 0], h @ head.linear.weight[0] + head.linear.bias[0])


# ---- gating network --------------------------------------------------------------------------

def _mlp_by_hand(gate: GatingNetwork, h: torch.Tensor) -> torch.Tensor:
    linears = [m for m in gate.mlp if isinstance(m, torch.nn.Linear)]
    x = h.double()
    for i, lin in enumerate(linears):
        x = x @ lin.weight.double().T + lin.bias.double()
        if i < len(linears) - 1:
            x = x.clamp_min(0.0)
    return x


@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_gating_rows_sum_to_one_and_match_softmax(num_layers):
    gate = GatingNetwork(D, num_attributes=5, hidden=16, num_layers=num_layers, temperature=0.7)
    assert sum(isinstance(m, torch.nn.Linear) for m in gate.mlp) == num_layers + 1
    h = torch.randn(9, D) * 3
    g = gate(h)
    assert g.shape == (9, 5)
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(9), rtol=0, atol=1e-6)
    torch.testing.assert_close(g.double(), torch.softmax(_mlp_by_hand(gate, h) / 0.7, -1), rtol=1e-5, atol=1e-6)


def test_gating_temperature_and_learnable_scale():
    hot = GatingNetwork(D, 6, hidden=16, temperature=10.0)
    cold = GatingNetwork(D, 6, hidden=16, temperature=0.1)
    cold.load_state_dict(hot.state_dict())
    h = torch.randn(32, D) * 5
    z = _mlp_by_hand(hot, h)
    g_hot, g_cold = hot(h).double(), cold(h).double()

    def entropy(p):
        return -(p * p.clamp_min(1e-300).log()).sum(-1)

    assert (entropy(g_hot) > entropy(g_cold)).all()  # higher temperature → flatter gate
    torch.testing.assert_close(g_cold, torch.softmax(z / 0.1, -1), rtol=1e-4, atol=1e-6)
    # the scale multiplies the logits and is trained
    with torch.no_grad():
        hot.log_scale.fill_(math.log(4.0))
    torch.testing.assert_close(hot(h).double(), torch.softmax(4.0 * z / 10.0, -1), rtol=1e-5, atol=1e-6)
    hot(h)[:, 0].sum().backward()
    assert hot.log_scale.grad is not None and hot.log_scale.grad.abs() > 0
    assert GatingNetwork(D, 3, hidden=4, init_scale=2.5).scale.item() == pytest.approx(2.5)


# ---- GMM, scalar and mean-variance heads ----------------------------------------------------

def test_gmm_head_fields_bounds_and_formula():
    assert MixtureParams._fields == ("logits", "mu", "log_sigma")  # GaussianMixture(*params) order
    head = GMMHead(D, k=3, min_sigma=1e-2, max_sigma=10.0)
    _randomize(head, 2.0)
    h = torch.randn(50, D, dtype=torch.float32) * 100  # saturates the bound on both sides
    p = head(h)
    assert isinstance(p, MixtureParams) and all(t.shape == (50, 3) for t in p)
    lo, hi = math.log(1e-2), math.log(10.0)
    assert (p.log_sigma >= lo - 1e-6).all() and (p.log_sigma <= hi + 1e-6).all()
    assert p.log_sigma.min() < lo + 0.01 and p.log_sigma.max() > hi - 0.01
    raw = h.double() @ head.linear.weight.double().T + head.linear.bias.double()
    torch.testing.assert_close(p.logits.double(), raw[:, :3], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(p.mu.double(), raw[:, 3:6], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(p.log_sigma.double(), lo + (hi - lo) / (1 + torch.exp(-raw[:, 6:])), rtol=1e-5, atol=1e-4)


def test_gmm_head_init_and_k1():
    p = GMMHead(D, k=3)(torch.zeros(2, D))
    torch.testing.assert_close(p.log_sigma, torch.zeros(2, 3), rtol=0, atol=1e-6)  # σ = 1 at the start
    torch.testing.assert_close(p.mu, torch.tensor([[-1.0, 0.0, 1.0]] * 2))  # components start apart
    p1 = GMMHead(D, k=1)(torch.randn(4, D))
    assert all(t.shape == (4, 1) for t in p1)


def test_scalar_and_mean_variance_heads():
    s = ScalarHead(D)
    h = torch.randn(6, D)
    torch.testing.assert_close(s(h), (h @ s.linear.weight.T + s.linear.bias)[:, 0])
    assert s(torch.randn(2, 3, D)).shape == (2, 3)
    mv = MeanVarianceHead(D, min_var=1e-4, max_var=1e2)
    _randomize(mv, 2.0)
    mean, log_var = mv(h * 100)
    assert mean.shape == log_var.shape == (6,)
    assert (log_var >= math.log(1e-4) - 1e-5).all() and (log_var <= math.log(1e2) + 1e-5).all()
    raw = (h * 100).double() @ mv.linear.weight.double().T + mv.linear.bias.double()
    torch.testing.assert_close(mean.double(), raw[:, 0], rtol=1e-5, atol=1e-3)


def test_heads_cast_features_to_their_dtype():
    head = QuantileHead(D).double()
    assert head(torch.randn(2, D, dtype=torch.bfloat16)).dtype == torch.float64


# ---- configs ---------------------------------------------------------------------------------

HEADS = [
    lambda: QuantileHead(D, 2, [0.25, 0.5, 0.75], non_crossing=True),
    lambda: QuantileHead(D),
    lambda: GatingNetwork(D, 4, hidden=8, num_layers=2, temperature=3.0, init_scale=0.5),
    lambda: GMMHead(D, k=2, min_sigma=0.1, max_sigma=5.0),
    lambda: ScalarHead(D),
    lambda: MeanVarianceHead(D, min_var=0.01, max_var=9.0),
]


@pytest.mark.parametrize("make", HEADS)
def test_config_rebuilds_the_head(make):
    head = make()
    data = json.loads(json.dumps(head_config_to_dict(head.config)))
    cfg = head_config_from_dict(data)
    assert cfg == head.config
    rebuilt = build_head(cfg)
    assert type(rebuilt) is type(head)
    rebuilt.load_state_dict(head.state_dict())
    h = torch.randn(3, D)
    a, b = head(h), rebuilt(h)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y)


# ---- bad configuration and input -------------------------------------------------------------

@pytest.mark.parametrize("make,exc,match", [
    (lambda: GMMHead(D, k=0), ValueError, "k must be >= 1"),
    (lambda: GMMHead(D, k=-2), ValueError, "k must be >= 1"),
    (lambda: GMMHead(D, k=1.5), TypeError, "k must be an int"),
    (lambda: GMMHead(D, min_sigma=2.0, max_sigma=1.0), ValueError, "min_sigma must be < max_sigma"),
    (lambda: GMMHead(D, min_sigma=0.0), ValueError, "min_sigma must be a finite float > 0"),
    (lambda: QuantileHead(D, taus=[0.0, 0.5]), ValueError, "strictly inside"),
    (lambda: QuantileHead(D, taus=[0.5, 1.0]), ValueError, "strictly inside"),
    (lambda: QuantileHead(D, taus=[0.2, float("nan")]), ValueError, "strictly inside"),
    (lambda: QuantileHead(D, taus=[0.5, 0.3]), ValueError, "strictly increasing"),
    (lambda: QuantileHead(D, taus=[0.2, 0.2]), ValueError, "strictly increasing"),
    (lambda: QuantileHead(D, taus=[]), ValueError, "at least one"),
    (lambda: QuantileHead(D, taus=torch.rand(2, 3)), ValueError, "1-D"),
    (lambda: QuantileHead(D, taus="abc"), TypeError, "taus must be a sequence"),
    (lambda: QuantileHead(D, num_attributes=0), ValueError, "num_attributes must be >= 1"),
    (lambda: QuantileHead(0), ValueError, "in_features must be >= 1"),
    (lambda: GatingNetwork(D, 3, temperature=0.0), ValueError, "temperature must be a finite float > 0"),
    (lambda: GatingNetwork(D, 3, temperature=float("inf")), ValueError, "temperature"),
    (lambda: GatingNetwork(D, 3, hidden=0), ValueError, "hidden must be >= 1"),
    (lambda: GatingNetwork(D, 3, num_layers=-1), ValueError, "num_layers must be >= 0"),
    (lambda: MeanVarianceHead(D, min_var=1.0, max_var=1.0), ValueError, "min_var must be < max_var"),
    (lambda: head_config_from_dict({"kind": "mlp", "in_features": 3}), ValueError, "kind must be one of"),
    (lambda: head_config_from_dict({"kind": "gmm", "in_features": 3, "K": 2}), ValueError, "unknown fields"),
    (lambda: build_head({"kind": "gmm"}), TypeError, "head config must be one of"),
])
def test_bad_config_raises(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("make", HEADS)
def test_feature_dim_mismatch_raises(make):
    head = make()
    with pytest.raises(ValueError, match=r"features must have shape \(\*, D\) with D = in_features = 12, got \(4, 11\)"):
        head(torch.randn(4, D - 1))
    with pytest.raises(ValueError, match="features must be a floating tensor"):
        head(torch.ones(4, D, dtype=torch.long))
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        head([[0.0] * D])


def test_config_is_validated_directly():
    with pytest.raises(ValueError, match="strictly increasing"):
        QuantileHeadConfig(D, taus=(0.3, 0.1))
    with pytest.raises(ValueError, match="k must be >= 1"):
        GMMHeadConfig(D, k=0)
    with pytest.raises(ValueError, match="temperature"):
        GatingNetworkConfig(D, 2, temperature=-1.0)
