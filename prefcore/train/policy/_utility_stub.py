"""Temporary stand-in for :func:`prefcore.utility.parse_utility` (being written on another branch).

# REPLACE-WITH-prefcore.utility — delete this file once ``prefcore.utility`` lands; the trainer
# reaches it only through :func:`prefcore.train.policy.config.load_utility`.

``parse_utility(spec)`` maps ``mean | ce:λ | mean-var:α | cvar:α | quantile:τ`` to a callable
``utility(dist) -> (B,)`` over a :class:`~prefcore.distributions.QuantileDistribution` or
:class:`~prefcore.distributions.GaussianMixture`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prefcore import distributions as D
from prefcore import ops

KINDS = ("mean", "ce", "mean-var", "cvar", "quantile")


@dataclass(frozen=True)
class Utility:
    kind: str
    param: float | None = None

    @property
    def spec(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    def __call__(self, dist) -> torch.Tensor:
        if self.kind == "mean":
            return dist.mean()
        if self.kind == "ce":
            if isinstance(dist, D.QuantileDistribution):  # QRM eq. 4 over equal-mass quantiles
                return ops.exp_utility(dist.values, float(self.param))
            return D.certainty_equivalent(dist, self.param)
        if self.kind == "mean-var":
            return D.mean_variance(dist, self.param)
        if self.kind == "cvar":
            return D.cvar(dist, self.param)
        return D.value_at_risk(dist, self.param)


def parse_utility(spec: str) -> Utility:
    if not isinstance(spec, str):
        raise ValueError(f"utility must be a string such as 'mean' or 'cvar:0.1', got {type(spec).__name__}")
    kind, _, arg = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"utility: unknown kind {kind!r} in {spec!r} (expected one of "
                         "mean | ce:λ | mean-var:α | cvar:α | quantile:τ)")
    if kind == "mean":
        if arg:
            raise ValueError(f"utility: 'mean' takes no parameter, got {spec!r}")
        return Utility("mean")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"utility: {kind} needs a number after ':', got {spec!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"utility: the parameter of {kind} must be finite, got {spec!r}")
    if kind in ("ce", "mean-var") and value < 0:
        raise ValueError(f"utility: {kind} needs a parameter >= 0 (risk-averse), got {spec!r}")
    if kind == "cvar" and not 0.0 < value <= 1.0:
        raise ValueError(f"utility: cvar:α needs α in (0, 1], got {spec!r}")
    if kind == "quantile" and not 0.0 < value < 1.0:
        raise ValueError(f"utility: quantile:τ needs τ in (0, 1), got {spec!r}")
    return Utility(kind, value)
