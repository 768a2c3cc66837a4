"""Reward heads on pooled backbone features: quantiles, Gaussian mixture, scalar, mean-variance.

Every head maps features ``h (*, D)`` (``D = in_features``; usually ``(B, D)``) to its output
with the leading dims kept, casts ``h`` to its own parameter dtype (so a float32 head can sit on
a bfloat16 backbone), and has a ``config`` (a frozen dataclass) from which
``type(head).from_config(config)`` rebuilds an identical, freshly initialised module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prefcore.models._checks import require_features, require_int, require_positive_float

DEFAULT_NUM_TAUS = 19


def default_taus() -> tuple[float, ...]:
    """QRM's 19 quantile levels 0.05, 0.10, …, 0.95 (rounded so 0.15 is 0.15, not 0.15000000000000002)."""
    return tuple(round(0.05 * k, 10) for k in range(1, DEFAULT_NUM_TAUS + 1))


def _normalize_taus(taus: object) -> tuple[float, ...]:
    """``None`` → the default levels; otherwise a non-empty, strictly increasing sequence in (0, 1)."""
    if taus is None:
        return default_taus()
    if isinstance(taus, torch.Tensor):
        if taus.dim() != 1:
            raise ValueError(f"taus must be a 1-D sequence of quantile levels, got a tensor of shape {tuple(taus.shape)}")
        values = [float(v) for v in taus.detach().to("cpu", torch.float64)]
    else:
        try:
            values = [float(v) for v in taus]  # type: ignore[union-attr]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"taus must be a sequence of floats or a 1-D tensor, got {taus!r}") from exc
    if not values:
        raise ValueError("taus must hold at least one quantile level, got an empty sequence")
    bad = [v for v in values if not (0.0 < v < 1.0)]  # also rejects NaN
    if bad:
        raise ValueError(f"taus must lie strictly inside (0, 1), got {bad[0]} in {values}")
    for a, b in zip(values, values[1:]):
        if not b > a:
            raise ValueError(f"taus must be strictly increasing, got {a} followed by {b} in {values}")
    return tuple(values)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``x`` with ``softplus(x) = y`` for ``y > 0``: ``y + log(−expm1(−y))``."""
    return y + torch.log(-torch.expm1(-y))


# ---- quantile head -------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantileHeadConfig:
    """Config of :class:`QuantileHead`; ``taus=None`` means the 19 QRM levels 0.05…0.95."""

    kind: ClassVar[str] = "quantile"
    in_features: int
    num_attributes: int = 1
    taus: tuple[float, ...] | None = None
    non_crossing: bool = False

    def __post_init__(self) -> None:
        require_int(self.in_features, "in_features", min_value=1)
        require_int(self.num_attributes, "num_attributes", min_value=1)
        object.__setattr__(self, "taus", _normalize_taus(self.taus))
        if not isinstance(self.non_crossing, bool):
            raise TypeError(f"non_crossing must be a bool, got {type(self.non_crossing).__name__}")


class QuantileHead(nn.Module):
    r"""M attributes × Q linear quantile heads (QRM §3.4.1): ``h (*, D) → (*, M, Q)``.

    ``taus (Q,)`` (a float32 buffer, strictly increasing inside (0, 1); it stays float32 when the
    head is cast to another dtype) are the levels each output column estimates; train with ``prefcore.ops.pinball_loss(out, scores, head.taus)``.

    ``non_crossing=False``: one linear layer, :math:`\hat Q_{mq} = w_{mq}^\top h + b_{mq}` (QRM).
    ``non_crossing=True``: the layer's outputs ``r`` are read as the first quantile plus
    increments, :math:`\hat Q_{m1} = r_{m1}`, :math:`\hat Q_{mq} = \hat Q_{m1} + \sum_{j=2}^{q}
    \operatorname{softplus}(r_{mj})`, so the quantiles never cross: each increment is ≥ 0 and
    floating-point addition of a non-negative number never decreases a value, so the output is
    non-decreasing along Q exactly, in every dtype.

    Initialisation: weights as ``nn.Linear``; biases set so that at ``h = 0`` the head outputs the
    standard normal quantiles :math:`\Phi^{-1}(\tau_q)` for every attribute (the non-crossing
    increments' biases are the inverse softplus of their gaps), i.e. an ordered, unit-scale start.
    """

    def __init__(self, in_features: int, num_attributes: int = 1, taus: object = None,
                 non_crossing: bool = False) -> None:
        super().__init__()
        self._config = QuantileHeadConfig(in_features, num_attributes, taus, non_crossing)  # type: ignore[arg-type]
        cfg = self._config
        q = len(cfg.taus)  # type: ignore[arg-type]
        self.register_buffer("taus", torch.tensor(cfg.taus, dtype=torch.float32))
        self.linear = nn.Linear(cfg.in_features, cfg.num_attributes * q)
        with torch.no_grad():
            z = torch.special.ndtri(torch.tensor(cfg.taus, dtype=torch.float64))
            if cfg.non_crossing and q > 1:
                gaps = (z[1:] - z[:-1]).clamp_min(1e-6)
                z = torch.cat([z[:1], _inverse_softplus(gaps)])
            self.linear.bias.copy_(z.to(torch.float32).repeat(cfg.num_attributes))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # ``.to(dtype)``/``.half()`` cast floating buffers too; the levels must stay exact float32
        # (0.15 is not representable in bfloat16), so they are rebuilt from the config after any cast.
        super()._apply(fn, recurse)
        self.taus = torch.tensor(self._config.taus, dtype=torch.float32, device=self.taus.device)
        return self

    @property
    def config(self) -> QuantileHeadConfig:
        return self._config

    @classmethod
    def from_config(cls, config: QuantileHeadConfig) -> QuantileHead:
        return cls(config.in_features, config.num_attributes, config.taus, config.non_crossing)

    @property
    def num_attributes(self) -> int:
        return self._config.num_attributes

    @property
    def num_quantiles(self) -> int:
        return len(self._config.taus)  # type: ignore[arg-type]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h (*, D)`` → quantiles ``(*, M, Q)`` in the head's dtype."""
        h = require_features(h, self._config.in_features)
        raw = self.linear(h.to(self.linear.weight.dtype))
        raw = raw.unflatten(-1, (self.num_attributes, self.num_quantiles))
        if not self._config.non_crossing or self.num_quantiles == 1:
            return raw
        first = raw[..., :1]
        return torch.cat([first, first + torch.cumsum(F.softplus(raw[..., 1:]), dim=-1)], dim=-1)

    def extra_repr(self) -> str:
        return f"num_attributes={self.num_attributes}, num_quantiles={self.num_quantiles}, non_crossing={self._config.non_crossing}"


# ---- Gaussian-mixture head -----------------------------------------------------------------

class MixtureParams(NamedTuple):
    """Gaussian-mixture parameters, each ``(*, K)``: unnormalised mixture logits, component
    means, log standard deviations. Field order matches ``GaussianMixture(logits, mu, log_sigma)``
    and ``prefcore.ops.gmm_nll(logits, mu, log_sigma, ...)``."""

    logits: torch.Tensor
    mu: torch.Tensor
    log_sigma: torch.Tensor


def _bounded_log(raw: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``lo + (hi − lo)·sigmoid(raw)``: a smooth map of ℝ onto (lo, hi)."""
    return lo + (hi - lo) * torch.sigmoid(raw)


def _check_bounds(low: float, high: float, low_name: str, high_name: str) -> tuple[float, float]:
    low = require_positive_float(low, low_name)
    high = require_positive_float(high, high_name)
    if not low < high:
        raise ValueError(f"{low_name} must be < {high_name}, got {low_name}={low}, {high_name}={high}")
    return low, high


@dataclass(frozen=True)
class GMMHeadConfig:
    """Config of :class:`GMMHead`: ``k`` components, σ bounded to ``(min_sigma, max_sigma)``."""

    kind: ClassVar[str] = "gmm"
    in_features: int
    k: int = 3
    min_sigma: float = 1e-3
    max_sigma: float = 1e3

    def __post_init__(self) -> None:
        require_int(self.in_features, "in_features", min_value=1)
        require_int(self.k, "k", min_value=1)
        lo, hi = _check_bounds(self.min_sigma, self.max_sigma, "min_sigma", "max_sigma")
        object.__setattr__(self, "min_sigma", lo)
        object.__setattr__(self, "max_sigma", hi)


class GMMHead(nn.Module):
    r"""K-component Gaussian-mixture reward head (DFL eq. 2, K = 3): ``h (*, D) → MixtureParams``.

    One linear layer ``D → 3K`` gives ``logits``, ``mu`` and a raw scale ``s``; the scale is
    bounded as :math:`\log\sigma = \log\sigma_{min} + (\log\sigma_{max} - \log\sigma_{min})
    \cdot\operatorname{sigmoid}(s)`. Why bounded: an unbounded ``log_sigma`` lets the NLL of a
    component sitting on repeated identical ratings run to −∞ (σ → 0) and overflows ``exp`` for
    large values; the default ``(1e-3, 1e3)`` is far wider than any rating scale in use (ratings
    in [−1, 1]) and puts ``σ = 1`` (the geometric midpoint) at ``s = 0``.

    Initialisation: weights as ``nn.Linear``; ``mu`` biases spread evenly over [−1, 1] (0 for
    K = 1) so the components start apart (breaks their symmetry), other biases 0.
    """

    def __init__(self, in_features: int, k: int = 3, *, min_sigma: float = 1e-3, max_sigma: float = 1e3) -> None:
        super().__init__()
        self._config = GMMHeadConfig(in_features, k, min_sigma, max_sigma)
        cfg = self._config
        self._log_lo, self._log_hi = math.log(cfg.min_sigma), math.log(cfg.max_sigma)
        self.linear = nn.Linear(cfg.in_features, 3 * cfg.k)
        with torch.no_grad():
            self.linear.bias.zero_()
            if cfg.k > 1:
                self.linear.bias[cfg.k:2 * cfg.k].copy_(torch.linspace(-1.0, 1.0, cfg.k))

    @property
    def config(self) -> GMMHeadConfig:
        return self._config

    @classmethod
    def from_config(cls, config: GMMHeadConfig) -> GMMHead:
        return cls(config.in_features, config.k, min_sigma=config.min_sigma, max_sigma=config.max_sigma)

    def forward(self, h: torch.Tensor) -> MixtureParams:
        """``h (*, D)`` → ``MixtureParams(logits, mu, log_sigma)``, each ``(*, K)``."""
        h = require_features(h, self._config.in_features)
        logits, mu, raw = self.linear(h.to(self.linear.weight.dtype)).chunk(3, dim=-1)
        return MixtureParams(logits, mu, _bounded_log(raw, self._log_lo, self._log_hi))

    def extra_repr(self) -> str:
        return f"k={self._config.k}, sigma in ({self._config.min_sigma:g}, {self._config.max_sigma:g})"


# ---- scalar and mean-variance heads --------------------------------------------------------

@dataclass(frozen=True)
class ScalarHeadConfig:
    """Config of :class:`ScalarHead`."""

    kind: ClassVar[str] = "scalar"
    in_features: int

    def __post_init__(self) -> None:
        require_int(self.in_features, "in_features", min_value=1)


class ScalarHead(nn.Module):
    """A plain (Bradley–Terry) reward head: ``h (*, D) → r (*,)``, one linear layer."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self._config = ScalarHeadConfig(in_features)
        self.linear = nn.Linear(in_features, 1)

    @property
    def config(self) -> ScalarHeadConfig:
        return self._config

    @classmethod
    def from_config(cls, config: ScalarHeadConfig) -> ScalarHead:
        return cls(config.in_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = require_features(h, self._config.in_features)
        return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)


class MeanVariance(NamedTuple):
    """A Gaussian reward: ``mean (*,)`` and ``log_var (*,)`` (log of the variance)."""

    mean: torch.Tensor
    log_var: torch.Tensor


@dataclass(frozen=True)
class MeanVarianceHeadConfig:
    """Config of :class:`MeanVarianceHead`: variance bounded to ``(min_var, max_var)``."""

    kind: ClassVar[str] = "mean_variance"
    in_features: int
    min_var: float = 1e-6
    max_var: float = 1e6

    def __post_init__(self) -> None:
        require_int(self.in_features, "in_features", min_value=1)
        lo, hi = _check_bounds(self.min_var, self.max_var, "min_var", "max_var")
        object.__setattr__(self, "min_var", lo)
        object.__setattr__(self, "max_var", hi)


class MeanVarianceHead(nn.Module):
    r"""Gaussian reward head: ``h (*, D) → MeanVariance(mean (*,), log_var (*,))``.

    One linear layer ``D → 2``; the variance is bounded like :class:`GMMHead`'s σ,
    :math:`\log v = \log v_{min} + (\log v_{max} - \log v_{min})\cdot\operatorname{sigmoid}(s)`
    (defaults ``(1e-6, 1e6)``, i.e. σ in ``(1e-3, 1e3)``; ``v = 1`` at ``s = 0``). Use it with the
    Gaussian NLL, or with the mean − α·Var objective (DFL eq. 5).
    """

    def __init__(self, in_features: int, *, min_var: float = 1e-6, max_var: float = 1e6) -> None:
        super().__init__()
        self._config = MeanVarianceHeadConfig(in_features, min_var, max_var)
        self._log_lo, self._log_hi = math.log(self._config.min_var), math.log(self._config.max_var)
        self.linear = nn.Linear(in_features, 2)
        with torch.no_grad():
            self.linear.bias.zero_()

    @property
    def config(self) -> MeanVarianceHeadConfig:
        return self._config

    @classmethod
    def from_config(cls, config: MeanVarianceHeadConfig) -> MeanVarianceHead:
        return cls(config.in_features, min_var=config.min_var, max_var=config.max_var)

    def forward(self, h: torch.Tensor) -> MeanVariance:
        h = require_features(h, self._config.in_features)
        mean, raw = self.linear(h.to(self.linear.weight.dtype)).unbind(-1)
        return MeanVariance(mean, _bounded_log(raw, self._log_lo, self._log_hi))
