"""Gaussian-mixture op family at DESIGN §5 sizes (B=8192, K=3, G=201)."""
from __future__ import annotations

import torch

import prefcore
from bench.harness import COPY, BenchCase
from prefcore.ops import reference


def _params(g: torch.Generator, b: int, k: int, device: torch.device) -> list[torch.Tensor]:
    logits = torch.randn(b, k, generator=g)
    mu = 0.5 * torch.randn(b, k, generator=g)
    log_sigma = 0.3 * torch.randn(b, k, generator=g) - 1.0
    return [t.to(device).requires_grad_() for t in (logits, mu, log_sigma)]


def _grid_inputs(b: int = 8192, k: int = 3, grid_size: int = 201, n: int = 10):
    # DFL eq. 3 by grid integration: each row's target is a histogram of n annotator scores
    # in [-1, 1] on a grid_size-point grid (the weights), normalised per row by the op.
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        params = _params(g, b, k, device)
        grid = torch.linspace(-1.0, 1.0, grid_size)
        scores = (torch.rand(b, n, generator=g) * 2 - 1)
        idx = ((scores + 1) / 2 * (grid_size - 1)).round().long()
        hist = torch.zeros(b, grid_size).scatter_add_(1, idx, torch.ones(b, n))
        return (*params, grid.to(device), hist.to(device)), {}
    return make


def _points_inputs(b: int = 8192, k: int = 3, n: int = 10):
    # The exact empirical NLL of each row's n raw annotator scores.
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        params = _params(g, b, k, device)
        scores = torch.rand(b, n, generator=g) * 2 - 1
        return (*params, scores.to(device)), {}
    return make


CASES = [
    BenchCase("gmm_nll", "B=8192 K=3 G=201 grid", _grid_inputs(),
              {"prefcore": prefcore.ops.gmm_nll, "reference": reference.gmm_nll},
              smoke_inputs=_grid_inputs(8, 2, 11, 4)),
    BenchCase("gmm_nll", "B=8192 K=3 N=10 points", _points_inputs(),
              {"prefcore": prefcore.ops.gmm_nll, "reference": reference.gmm_nll},
              smoke_inputs=_points_inputs(8, 2, 4), bound=COPY),
]
