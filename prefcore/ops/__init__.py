"""prefcore's fused operators (``torch.ops.prefcore.*``) with validation, autograd and
``torch.compile`` support. :mod:`prefcore.ops.reference` holds the pure-PyTorch twins."""
from prefcore.ops import reference
from prefcore.ops.advantages import (
    Advantages,
    k_major_to_prompt_major,
    kl_penalized_advantages,
    masked_whiten,
    prompt_major_to_k_major,
)
from prefcore.ops.gmm import gmm_nll
from prefcore.ops.quantile import exp_utility, pinball_loss
from prefcore.ops.token_logprobs import token_logprobs

__all__ = [
    "reference",
    "pinball_loss",
    "exp_utility",
    "gmm_nll",
    "Advantages",
    "kl_penalized_advantages",
    "masked_whiten",
    "k_major_to_prompt_major",
    "prompt_major_to_k_major",
    "token_logprobs",
]
