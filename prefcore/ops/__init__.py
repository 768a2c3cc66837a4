"""prefcore's fused operators (``torch.ops.prefcore.*``) with validation, autograd and
``torch.compile`` support. :mod:`prefcore.ops.reference` holds the pure-PyTorch twins."""
from prefcore.ops import reference
from prefcore.ops.gmm import gmm_nll
from prefcore.ops.quantile import exp_utility, pinball_loss

__all__ = [
    "reference",
    "pinball_loss",
    "exp_utility",
    "gmm_nll",
]
