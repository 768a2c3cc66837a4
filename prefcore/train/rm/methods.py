"""The reward-model methods: which heads each builds, the stages that train them, and the
held-out metrics each reports. Used by :func:`prefcore.train.rm.trainer.train_reward_model`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prefcore import distributions as D
from prefcore import ops
from prefcore.eval import metrics as M
from prefcore.losses import bradley_terry_loss
from prefcore.models import GatingNetwork, GMMHead, MeanVarianceHead, QuantileHead, ScalarHead
from prefcore.train.rm.data import PairsData, RatingsData, RMData

Batch = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Stage:
    name: str
    params: list[nn.Parameter]
    batch_loss: Batch
    n_items: int
    steps: int


def _need(part, what: str, method: str):
    if part is None or len(part) == 0:
        raise ValueError(f"method {method!r} needs {what} data, but none was given")
    return part


# ---- building heads -------------------------------------------------------------------------

def head_config(method: str, data: RMData, cfg) -> dict:
    """The JSON-serialisable description from which :func:`build_heads` rebuilds the heads."""
    hc: dict = {"method": method, "trunk_layers": int(cfg.trunk_layers), "trunk_width": int(cfg.trunk_width)}
    if method in ("bt", "bt-margin"):
        hc["in_features"] = int(_need(data.pairs, "pairs", method).chosen.shape[1])
    elif method == "qrm":
        r = _need(data.ratings, "ratings or attributes", method)
        p = _need(data.pairs, "pairs (with prompt features) for the gating stage", method)
        if p.prompt is None:
            raise ValueError("method 'qrm' needs prompt features on its pairs for the gating network")
        hc.update(in_features=int(r.features.shape[1]), num_attributes=r.num_attributes,
                  prompt_features=int(p.prompt.shape[1]), non_crossing=bool(cfg.non_crossing),
                  attribute_names=list(r.attribute_names))
    else:
        r = _need(data.ratings, "ratings", method)
        hc["in_features"] = int(r.features.shape[1])
        if method == "gmm":
            hc["k"] = int(cfg.k)
    return hc


def make_trunk(in_features: int, layers: int, width: int) -> nn.Module:
    """``layers`` × (Linear → GELU) of ``width`` on the response features; ``layers = 0`` is the
    identity (linear heads directly on the frozen features, as QRM does)."""
    if layers < 0 or (layers > 0 and width < 1):
        raise ValueError(f"trunk_layers must be >= 0 and trunk_width >= 1, got {layers}, {width}")
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_features if i == 0 else width, width), nn.GELU()]
    return nn.Sequential(*mods)


def build_heads(hc: dict) -> nn.ModuleDict:
    """``trunk`` (on response features) plus the method's heads, from :func:`head_config`."""
    method = hc["method"]
    trunk = make_trunk(hc["in_features"], hc["trunk_layers"], hc["trunk_width"])
    d = hc["trunk_width"] if hc["trunk_layers"] > 0 else hc["in_features"]
    if method in ("bt", "bt-margin"):
        heads = {"scalar": ScalarHead(d)}
    elif method == "qrm":
        heads = {"quantile": QuantileHead(d, num_attributes=hc["num_attributes"], non_crossing=hc["non_crossing"]),
                 "gate": GatingNetwork(hc["prompt_features"], hc["num_attributes"])}
    elif method == "gmm":
        heads = {"gmm": GMMHead(d, k=hc["k"])}
    elif method == "mean-var":
        heads = {"meanvar": MeanVarianceHead(d)}
    else:
        raise ValueError(f"unknown method {method!r}")
    return nn.ModuleDict({"trunk": trunk, **heads})


def _head(heads: nn.ModuleDict, name: str) -> Callable[[torch.Tensor], object]:
    """``features ↦ heads[name](trunk(features))``."""
    trunk, head = heads["trunk"], heads[name]
    return lambda x: head(trunk(x))


def _params(heads: nn.ModuleDict, name: str) -> list[nn.Parameter]:
    return [*heads["trunk"].parameters(), *heads[name].parameters()]


# ---- losses -----------------------------------------------------------------------------------

def _bt_stage(heads: nn.ModuleDict, pairs: PairsData, method: str, steps: int) -> Stage:
    head = _head(heads, "scalar")
    if method == "bt-margin" and pairs.margin is None:
        raise ValueError("method 'bt-margin' needs pairs with votes or a margin")

    def batch(idx):
        r_c, r_r = head(pairs.chosen[idx]), head(pairs.rejected[idx])
        loss = bradley_terry_loss(r_c, r_r, margin=pairs.margin[idx] if method == "bt-margin" else None)
        return loss, {"accuracy": float((r_c > r_r).float().mean())}
    return Stage("bt", _params(heads, "scalar"), batch, len(pairs), steps)


def _gaussian_nll(mean: torch.Tensor, log_var: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over items (with ≥ 1 score) of the mean Gaussian NLL of their valid scores: the fused
    mixture NLL with one component, ``σ = exp(½ log σ²)``."""
    one = torch.zeros_like(mean)[:, None]
    return ops.gmm_nll(one, mean[:, None], 0.5 * log_var[:, None], scores, mask.to(scores.dtype))


def _gmm_target(ratings: RatingsData, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(points, weights) of the gmm_nll target for attribute 0: the raw scores with the mask as
    weights, or a grid over the score range with a fitted-mixture / KDE density as weights."""
    scores, mask = ratings.scores[:, 0], ratings.mask[:, 0]
    if cfg.gmm_target == "scores":
        return scores, mask.to(scores.dtype)
    lo, hi = cfg.range
    grid = torch.linspace(lo, hi, cfg.grid_size, dtype=scores.dtype)
    if cfg.gmm_target == "histogram":
        return grid, D.grid_histogram(scores, mask, grid, cfg.bandwidth)
    fit = D.fit_gmm_em(scores, mask, cfg.k)
    w = fit.log_prob(grid).softmax(-1)
    return grid, w


def quantile_stage(heads: nn.ModuleDict, ratings: RatingsData, steps: int) -> Stage:
    """QRM stage 1: the quantile heads with the fused pinball loss (``ratings.features[idx]``
    may be computed on demand, e.g. by a backbone being fine-tuned)."""
    qh, taus = _head(heads, "quantile"), heads["quantile"].taus

    def quantile_batch(idx):
        pred = qh(ratings.features[idx])  # (B, M, Q)
        return ops.pinball_loss(pred, ratings.scores[idx], taus, ratings.mask[idx]), {}
    return Stage("quantile", _params(heads, "quantile"), quantile_batch, len(ratings), steps)


def gating_stage(heads: nn.ModuleDict, pairs: PairsData, steps: int) -> Stage:
    """QRM stage 2: the gating network with BT on ``Σ_m g_m·E[Q_m]``, quantile heads frozen."""
    qh, gate = _head(heads, "quantile"), heads["gate"]

    def gate_batch(idx):
        with torch.no_grad():
            e_c = qh(pairs.chosen[idx]).mean(-1)  # (B, M): E[Q_m] under equal-mass quantiles
            e_r = qh(pairs.rejected[idx]).mean(-1)
        g = gate(pairs.prompt[idx])
        r_c, r_r = (g * e_c).sum(-1), (g * e_r).sum(-1)
        return bradley_terry_loss(r_c, r_r), {"accuracy": float((r_c > r_r).float().mean())}
    return Stage("gating", list(gate.parameters()), gate_batch, len(pairs), steps)


def stages(method: str, heads: nn.ModuleDict, train: RMData, cfg) -> list[Stage]:
    if method in ("bt", "bt-margin"):
        return [_bt_stage(heads, _need(train.pairs, "pairs", method), method, cfg.steps)]
    ratings = _need(train.ratings, "ratings", method)
    if method == "qrm":
        return [quantile_stage(heads, ratings, cfg.steps),
                gating_stage(heads, _need(train.pairs, "pairs", method), cfg.gate_steps)]
    if method == "gmm":
        head = _head(heads, "gmm")
        points, weights = _gmm_target(ratings, cfg)
        shared = points.dim() == 1

        def gmm_batch(idx):
            p = head(ratings.features[idx])
            pts = points if shared else points[idx]
            return ops.gmm_nll(p.logits, p.mu, p.log_sigma, pts, weights[idx]), {}
        return [Stage("gmm", _params(heads, "gmm"), gmm_batch, len(ratings), cfg.steps)]
    if method == "mean-var":
        head = _head(heads, "meanvar")
        s, m = ratings.scores[:, 0], ratings.mask[:, 0]

        def mv_batch(idx):
            mean, log_var = head(ratings.features[idx])
            return _gaussian_nll(mean, log_var, s[idx], m[idx]), {}
        return [Stage("mean-var", _params(heads, "meanvar"), mv_batch, len(ratings), cfg.steps)]
    raise ValueError(f"unknown method {method!r}")


# ---- evaluation ---------------------------------------------------------------------------------

def _risk_summary(dist, cfg) -> dict[str, float]:
    return {
        "mean_reward": float(dist.mean().mean()),
        f"ce_lambda_{cfg.risk_lambda:g}": float(D.certainty_equivalent(dist, cfg.risk_lambda).mean()),
        f"cvar_{cfg.risk_alpha:g}": float(D.cvar(dist, cfg.risk_alpha).mean()),
        f"var_{cfg.risk_alpha:g}": float(D.value_at_risk(dist, cfg.risk_alpha).mean()),
    }


@torch.no_grad()
def evaluate(method: str, heads: nn.ModuleDict, test: RMData, cfg) -> dict[str, float]:
    """Held-out metrics of the trained heads (names are stable: they go into report.json)."""
    heads.eval()
    out: dict[str, float] = {}
    if method in ("bt", "bt-margin"):
        p = test.pairs
        head = _head(heads, "scalar")
        r_c, r_r = head(p.chosen), head(p.rejected)
        out["pairwise_accuracy"] = float(M.pairwise_accuracy(r_c, r_r))
        votes = p.vote_fraction()
        if votes is not None and int(votes[1].sum()) >= 2:  # pairs without votes are left out
            frac, has = votes
            out["pearson_vote_fraction"] = float(M.pearson(torch.sigmoid(r_c - r_r)[has], frac[has]))
        out["num_eval_pairs"] = len(p)
        return out
    r = test.ratings
    out["num_eval_items"] = len(r)
    if method == "qrm":
        qh, taus = _head(heads, "quantile"), heads["quantile"].taus
        pred = qh(r.features)  # (N, M, Q)
        n, m, q = pred.shape
        cov = M.quantile_coverage(pred.reshape(n * m, q), taus, r.scores.reshape(n * m, r.scores.shape[-1]),
                                  r.mask.reshape(n * m, r.mask.shape[-1]))
        for tau, c in zip(taus.tolist(), cov.tolist()):
            out[f"coverage_{tau:.2f}"] = c
        out["coverage_max_abs_error"] = float((cov - taus).abs().max())
        out["pinball_loss"] = float(ops.pinball_loss(pred, r.scores, taus, r.mask))
        if r.prompt_features is not None:
            # The reward QRM optimises: the gated mixture Q_mix = Σ_m g_m·Q_m, in QRM's convention
            # (equal-mass quantiles: mean = average quantile, CE = exp_utility, eq. 4); CVaR/VaR of
            # the piecewise-linear quantile function (prefcore.distributions).
            q_mix = (heads["gate"](r.prompt_features)[..., None] * pred).sum(1)  # (N, Q)
            dist = D.QuantileDistribution(q_mix, taus)
            out["gated_mean_reward"] = float(q_mix.mean())
            out[f"gated_ce_lambda_{cfg.risk_lambda:g}"] = float(ops.exp_utility(q_mix, cfg.risk_lambda).mean())
            out[f"gated_cvar_{cfg.risk_alpha:g}"] = float(D.cvar(dist, cfg.risk_alpha).mean())
            out[f"gated_var_{cfg.risk_alpha:g}"] = float(D.value_at_risk(dist, cfg.risk_alpha).mean())
        if test.pairs is not None and len(test.pairs):
            p = test.pairs
            g = heads["gate"](p.prompt)
            r_c = (g * qh(p.chosen).mean(-1)).sum(-1)
            r_r = (g * qh(p.rejected).mean(-1)).sum(-1)
            out["pairwise_accuracy"] = float(M.pairwise_accuracy(r_c, r_r))
        return out
    s, mk = r.scores[:, 0], r.mask[:, 0]
    if method == "gmm":
        params = _head(heads, "gmm")(r.features)
        dist = D.GaussianMixture(params.logits, params.mu, params.log_sigma)
        w = mk.to(s.dtype)
        out["nll"] = float(ops.gmm_nll(params.logits, params.mu, params.log_sigma, s, w))
        if r.truth_logits is not None:
            out["nll_true_mixture"] = float(ops.gmm_nll(r.truth_logits, r.truth_mu, r.truth_log_sigma, s, w))
        out["crps"] = float(M.crps_gmm(dist, s, mk).mean())
        out["uce"] = float(M.uce(dist, s, mk))
        out.update(_risk_summary(dist, cfg))
        return out
    mean, log_var = _head(heads, "meanvar")(r.features)
    out["nll"] = float(_gaussian_nll(mean, log_var, s, mk))
    out["uce"] = float(M.uce(log_var.exp(), s, mk))
    out.update(_risk_summary(D.GaussianMixture(torch.zeros_like(mean)[:, None], mean[:, None],
                                               0.5 * log_var[:, None]), cfg))
    return out
