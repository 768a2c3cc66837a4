"""Use a ``prefcore train-rm`` run: score new (prompt, response) texts, or features, with the
trained trunk and heads — as reward distributions and as risk-aware scalar rewards.

>>> scorer = RunScorer.load("runs/rm-gmm")                       # backbone path from the run's config
>>> dist = scorer.reward_distribution(prompts, responses)       # GaussianMixture (gmm, mean-var) or
...                                                             # QuantileDistribution (qrm, gated)
>>> r = scorer.reward(prompts, responses, risk="cvar", alpha=0.1)
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prefcore import distributions as D
from prefcore import ops

RISKS = ("mean", "ce", "mean-var", "cvar", "var")


@dataclass
class RunScorer:
    """The heads of a run (``heads``, ``head_config``) and, for text, the frozen backbone and
    tokenizer the run embedded its texts with (``backbone`` None for runs on the synthetic default:
    score features then)."""

    heads: nn.ModuleDict
    head_config: dict
    backbone: nn.Module | None = None
    tokenizer: object | None = None
    max_length: int = 256

    @classmethod
    def load(cls, run_dir: str, *, backbone: str | None = None, device: str = "cpu") -> RunScorer:
        """Load ``run_dir``'s heads; the backbone is ``backbone``, else the run's stored
        ``RUN/backbone``, else the ``--backbone`` path recorded in its config."""
        from prefcore.train.rm.trainer import load_heads

        heads, head_cfg = load_heads(run_dir)
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        from prefcore.train.rm.rmdir import stored_backbone

        # the run's own copy (RUN/backbone) first: a moved run no longer needs the original path
        path = backbone or stored_backbone(run_dir) or cfg.get("backbone")
        if path is None:
            return cls(heads, head_cfg, max_length=cfg.get("max_length", 256))
        from prefcore.train.rm.sources import load_text_encoder

        backbone_model, tok = load_text_encoder(path, device)  # as the run embedded its texts
        return cls(heads, head_cfg, backbone_model, tok, cfg.get("max_length", 256))

    # ---- features ----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        from prefcore.train.rm.features import embed_texts

        if self.backbone is None:
            raise ValueError("this run was trained on features (synthetic default): pass features, not texts")
        return embed_texts(self.backbone, self.tokenizer, texts, max_length=self.max_length).float()

    def text_features(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from prefcore.train.rm.sources import response_text

        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
        return self.embed([response_text(p, r) for p, r in zip(prompts, responses)]), self.embed(list(prompts))

    # ---- outputs -----------------------------------------------------------------------------

    @torch.no_grad()
    def distribution_from_features(self, features: torch.Tensor, prompt_features: torch.Tensor | None = None):
        """The reward distribution of responses with ``features (B, D)``: a GaussianMixture (gmm;
        mean-var as K = 1), a QuantileDistribution (qrm: the gated mixture Σ_m g_m·Q_m, which needs
        ``prompt_features (B, Dp)``), or the scalar rewards ``(B,)`` (bt, bt-margin)."""
        method = self.head_config["method"]
        h = self.heads["trunk"](features)
        if method in ("bt", "bt-margin"):
            return self.heads["scalar"](h)
        if method == "gmm":
            p = self.heads["gmm"](h)
            return D.GaussianMixture(p.logits, p.mu, p.log_sigma)
        if method == "mean-var":
            mean, log_var = self.heads["meanvar"](h)
            return D.GaussianMixture(torch.zeros_like(mean)[:, None], mean[:, None], 0.5 * log_var[:, None])
        q = self.heads["quantile"](h)  # (B, M, Q)
        if prompt_features is None:
            raise ValueError("a qrm run needs prompt_features for its gating network")
        gate = self.heads["gate"](prompt_features)
        return D.QuantileDistribution((gate[..., None] * q).sum(1), self.heads["quantile"].taus)

    def reward_distribution(self, prompts: Sequence[str], responses: Sequence[str]):
        feats, prompt_feats = self.text_features(prompts, responses)
        return self.distribution_from_features(feats, prompt_feats)

    def reward(self, prompts: Sequence[str], responses: Sequence[str], *, risk: str = "mean",
               lam: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
        """A scalar reward per response ``(B,)``: the risk functional ``risk`` of its distribution
        (``mean``, ``ce`` with λ = ``lam``, ``mean-var`` (mean − α·Var), ``cvar`` / ``var`` at
        ``alpha``); bt runs return their scalar reward whatever ``risk`` is."""
        return risk_reward(self.reward_distribution(prompts, responses), risk, lam=lam, alpha=alpha)


def risk_reward(dist, risk: str, *, lam: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """The scalar reward ``risk`` of a distribution (or scalar rewards, returned as they are).
    For a QRM quantile set, ``ce`` follows QRM eq. 4 (equal-mass quantiles, ``ops.exp_utility``)."""
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    if isinstance(dist, torch.Tensor):
        return dist
    if risk == "mean":
        return dist.mean()
    if risk == "ce":
        if isinstance(dist, D.QuantileDistribution):
            return ops.exp_utility(dist.values, float(lam))
        return D.certainty_equivalent(dist, lam)
    if risk == "mean-var":
        return D.mean_variance(dist, alpha)
    return D.cvar(dist, alpha) if risk == "cvar" else D.value_at_risk(dist, alpha)
