r"""Utilities: the scalar a policy maximises, read off a reward *distribution*.

A utility is written as a short spec (the ``--utility`` setting of ``prefcore train-policy``, the
``utility=`` argument of :func:`prefcore.integrations.trl.reward_function`):

==================  ==========================================================================
``mean``            :math:`\mathbb{E}[r]`
``ce:λ``            certainty equivalent of exponential utility (QRM eq. 4, reward units):
                    quantile sets (QRM runs) use :func:`prefcore.ops.exp_utility` over the
                    equal-mass quantile values, :math:`-\frac1\lambda(\operatorname{logsumexp}_q(-\lambda Q_q) - \log Q)`;
                    Gaussian mixtures the exact :math:`-\frac1\lambda\log\mathbb{E}[e^{-\lambda r}]`.
                    λ finite; λ > 0 risk-averse, λ = 0 the mean, λ < 0 risk-seeking.
``mean-var:α``      DFL eq. 5, :math:`\mathbb{E}[r] - \alpha\,\mathrm{Var}[r]`; α finite (0.5 risk-averse).
``cvar:α``          lower-tail CVaR :math:`\frac1\alpha\int_0^\alpha F^{-1}(u)\,du`, α ∈ (0, 1].
``quantile:τ``      the τ-quantile :math:`F^{-1}(\tau)`, τ ∈ (0, 1).
==================  ==========================================================================

Scalar rewards (a Bradley–Terry run, a plain reward function) have no distribution: only ``mean``
applies to them (they are returned unchanged); any other utility raises ``ValueError``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

__all__ = ["UTILITY_KINDS", "Utility", "parse_utility", "utility_of_rewards"]

UTILITY_KINDS: tuple[str, ...] = ("mean", "ce", "mean-var", "cvar", "quantile")
_PARAM_NAME = {"ce": "λ", "mean-var": "α", "cvar": "α", "quantile": "τ"}
_EXAMPLE = {"ce": 1, "mean-var": 0.5, "cvar": 0.1, "quantile": 0.05}
_FORMS = "mean | ce:λ | mean-var:α | cvar:α | quantile:τ"


@dataclass(frozen=True)
class Utility:
    """A parsed utility: ``kind`` ∈ :data:`UTILITY_KINDS` and its parameter ``param`` (``None``
    for ``mean``). ``str(u)`` is the canonical spec (``"cvar:0.1"``); ``u(dist)`` applies it."""

    kind: str
    param: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in UTILITY_KINDS:
            raise ValueError(f"utility kind must be one of {UTILITY_KINDS}, got {self.kind!r}")
        if self.kind == "mean":
            if self.param is not None:
                raise ValueError(f"utility 'mean' takes no parameter, got {self.param!r}")
            return
        _check_param(self.kind, self.param, f"{self.kind}:{self.param}", "utility")

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def is_risk_neutral(self) -> bool:
        """True for ``mean`` and the parameters that reduce to it (``ce:0``, ``mean-var:0``, ``cvar:1``)."""
        return self.kind == "mean" or (self.kind in ("ce", "mean-var") and self.param == 0) or (
            self.kind == "cvar" and self.param == 1)

    def __call__(self, dist) -> Tensor:
        """The utility of each element of a batch of reward distributions → ``(B,)`` (or the batch
        shape): ``dist`` is a :class:`~prefcore.distributions.QuantileDistribution`, a
        :class:`~prefcore.distributions.GaussianMixture`, or a tensor of scalar rewards (``mean``
        only). Differentiable where the underlying functions are."""
        from prefcore import distributions as D
        from prefcore import ops

        if isinstance(dist, Tensor):
            if self.is_risk_neutral:
                return dist
            raise ValueError(f"utility {str(self)!r} needs a reward distribution, but the reward gives scalars "
                             "(e.g. a bt run or a scalar reward function): use utility='mean'")
        if not isinstance(dist, (D.QuantileDistribution, D.GaussianMixture)):
            raise TypeError(f"dist must be a QuantileDistribution, a GaussianMixture or a tensor of rewards, got {type(dist).__name__}")
        if self.kind == "mean":
            return dist.mean()
        if self.kind == "ce":
            if isinstance(dist, D.QuantileDistribution):
                v = dist.values
                return ops.exp_utility(v.reshape(-1, v.shape[-1]), float(self.param)).reshape(v.shape[:-1])
            return D.certainty_equivalent(dist, float(self.param))
        if self.kind == "mean-var":
            return D.mean_variance(dist, float(self.param))
        if self.kind == "cvar":
            return D.cvar(dist, float(self.param))
        return D.value_at_risk(dist, float(self.param))  # the τ-quantile


def _check_param(kind: str, value: object, spec: str, setting: str) -> float:
    sym = _PARAM_NAME[kind]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{setting}: {sym} in {spec!r} must be a finite number, got {value!r}")
    v = float(value)
    if kind == "cvar" and not 0.0 < v <= 1.0:
        raise ValueError(f"{setting}: α of cvar must lie in (0, 1], got {v:g} in {spec!r}")
    if kind == "quantile" and not 0.0 < v < 1.0:
        raise ValueError(f"{setting}: τ of quantile must lie strictly inside (0, 1), got {v:g} in {spec!r}")
    return v


def parse_utility(spec: str | Utility, *, setting: str = "utility") -> Utility:
    """Parse a utility spec (``"mean"``, ``"ce:2"``, ``"mean-var:0.5"``, ``"cvar:0.1"``,
    ``"quantile:0.05"``; case and surrounding spaces ignored) into a :class:`Utility`; a
    :class:`Utility` is returned as it is. Errors are ``ValueError`` naming ``setting`` (the flag or
    argument the spec came from), the accepted forms, and what is wrong: an unknown name, a missing
    or non-numeric parameter, a parameter on ``mean``, or a parameter out of range."""
    if isinstance(spec, Utility):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"{setting} must be a string ({_FORMS}), got {type(spec).__name__} {spec!r}")
    text = spec.strip().lower()
    kind, sep, raw = text.partition(":")
    kind = kind.strip()
    if kind not in UTILITY_KINDS:
        raise ValueError(f"{setting}: unknown utility {kind!r} in {spec!r}; expected one of {_FORMS}")
    if kind == "mean":
        if sep:
            raise ValueError(f"{setting}: 'mean' takes no parameter, got {spec!r}")
        return Utility("mean")
    if not sep or not raw.strip():
        raise ValueError(f"{setting}: {kind!r} needs a parameter, e.g. {kind}:{_EXAMPLE[kind]}; got {spec!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{setting}: {_PARAM_NAME[kind]} in {spec!r} must be a number, got {raw.strip()!r}") from None
    return Utility(kind, _check_param(kind, value, spec, setting))


def utility_of_rewards(utility: str | Utility, dist) -> Tensor:
    """``parse_utility(utility)(dist)`` — a convenience for callers holding a spec string."""
    return parse_utility(utility)(dist)

