"""Quantile op family at DESIGN §5 sizes."""
from __future__ import annotations

import torch

import prefcore
from bench.harness import COPY, BenchCase
from prefcore.ops import reference


def _pinball_inputs(kappa: float, b: int = 8192, m: int = 19, q: int = 19, n: int = 10):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        pred = torch.randn(b, m, q, generator=g).to(device).requires_grad_()
        target = torch.randn(b, m, n, generator=g).to(device)
        taus = torch.linspace(0.05, 0.95, q).to(device)
        return (pred, target, taus), {"kappa": kappa}
    return make


def _utility_inputs(b: int = 65536, m: int = 19, q: int = 19):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        quantiles = torch.randn(b, m, q, generator=g).sort(-1).values.to(device).requires_grad_()
        gate = torch.softmax(torch.randn(b, m, generator=g), -1).to(device).requires_grad_()
        return (quantiles, 1.0, gate), {"kind": "ce"}
    return make


CASES = [
    BenchCase("pinball_loss", "B=8192 M=19 Q=19 N=10", _pinball_inputs(0.0),
              {"prefcore": prefcore.ops.pinball_loss, "reference": reference.pinball_loss},
              smoke_inputs=_pinball_inputs(0.0, 8, 3, 5, 4), bound=COPY),
    BenchCase("pinball_loss", "B=8192 M=19 Q=19 N=10 kappa=1", _pinball_inputs(1.0),
              {"prefcore": prefcore.ops.pinball_loss, "reference": reference.pinball_loss},
              smoke_inputs=_pinball_inputs(1.0, 8, 3, 5, 4), bound=COPY),
    # issue 19: besides the 65536 row, the sizes one RL step scores (B completions, M = Q = 19)
    *[BenchCase("exp_utility", f"gated B={b} M=19 Q=19 ce", _utility_inputs(b),
                {"prefcore": prefcore.ops.exp_utility, "reference": reference.exp_utility},
                smoke_inputs=_utility_inputs(8, 3, 5), bound=COPY)
      for b in (512, 4096, 65536)],
]
