"""The gating network of QRM/ArmoRM: prompt features → mixing weights over M attributes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prefcore.models._checks import require_features, require_int, require_positive_float


@dataclass(frozen=True)
class GatingNetworkConfig:
    """Config of :class:`GatingNetwork`."""

    kind: ClassVar[str] = "gating"
    in_features: int
    num_attributes: int
    hidden: int = 1024
    num_layers: int = 3
    temperature: float = 1.0
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        require_int(self.in_features, "in_features", min_value=1)
        require_int(self.num_attributes, "num_attributes", min_value=1)
        require_int(self.hidden, "hidden", min_value=1)
        require_int(self.num_layers, "num_layers", min_value=0)
        object.__setattr__(self, "temperature", require_positive_float(self.temperature, "temperature"))
        object.__setattr__(self, "init_scale", require_positive_float(self.init_scale, "init_scale"))


class GatingNetwork(nn.Module):
    r"""MLP gate over attributes (QRM §3.4.2, after ArmoRM): ``h (*, D) → g (*, M)``, rows sum to 1.

    ``num_layers`` hidden layers of width ``hidden`` with ReLU (QRM: 3), then a linear layer to M
    logits ``z`` and :math:`g = \operatorname{softmax}(s\cdot z/T)` with the fixed temperature
    ``T = temperature`` and a learnable scale :math:`s = e^{\ell} > 0` (``log_scale`` ℓ, starting at
    ``log(init_scale)``). The scale is kept positive so it only sharpens (s → ∞: one-hot argmax)
    or flattens (s → 0: uniform) the gate, never reverses its ranking; T sets where it starts.
    The input is meant to be features of the prompt alone. In QRM the gate is trained with
    Bradley–Terry on the expected reward of the mixture ``Σ_m g_m·Q_m`` with the quantile heads
    frozen. The softmax is computed in float32 at least, and returned in the head's dtype.
    """

    def __init__(self, in_features: int, num_attributes: int, hidden: int = 1024, num_layers: int = 3,
                 temperature: float = 1.0, init_scale: float = 1.0) -> None:
        super().__init__()
        self._config = GatingNetworkConfig(in_features, num_attributes, hidden, num_layers, temperature, init_scale)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_attributes))
        self.mlp = nn.Sequential(*layers)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self._config.init_scale)))

    @property
    def config(self) -> GatingNetworkConfig:
        return self._config

    @classmethod
    def from_config(cls, config: GatingNetworkConfig) -> GatingNetwork:
        return cls(config.in_features, config.num_attributes, config.hidden, config.num_layers,
                   config.temperature, config.init_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tempered, scaled logits ``s·z/T`` ``(*, M)`` (log-weights up to a per-row constant)."""
        h = require_features(h, self._config.in_features)
        z = self.mlp(h.to(self.log_scale.dtype))
        return z * (self.log_scale.exp() / self._config.temperature)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h (*, D)`` → gate weights ``(*, M)``, non-negative, summing to 1 over M."""
        z = self.logits(h)
        return torch.softmax(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=-1).to(z.dtype)

    def extra_repr(self) -> str:
        return f"temperature={self._config.temperature:g}"
