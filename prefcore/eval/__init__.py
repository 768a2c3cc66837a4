"""Evaluation metrics: pairwise accuracy, Pearson/L1 to aggregate preference, quantile coverage,
CRPS, NLL, UCE, DAS, CRR and PMR (DESIGN §4). See :mod:`prefcore.eval.metrics` for the formulas."""
from prefcore.eval.metrics import (
    crps,
    crps_gmm,
    crps_quantile,
    crr,
    das,
    l1,
    nll,
    pairwise_accuracy,
    pearson,
    pmr,
    quantile_coverage,
    uce,
)

__all__ = [
    "pairwise_accuracy",
    "pearson",
    "l1",
    "quantile_coverage",
    "crps",
    "crps_quantile",
    "crps_gmm",
    "nll",
    "uce",
    "das",
    "crr",
    "pmr",
]
