"""KL-penalised advantages (DESIGN §3.4) at DESIGN §5 sizes. No autograd, so forward only.

For GAE the eager reference is the reverse Python loop over T that TRL/verl/OpenRLHF use;
``reference_vectorized`` is the chunked vectorised torch variant (also timed compiled).
"""
from __future__ import annotations

import functools

import torch

import prefcore
from bench.harness import COPY, BenchCase
from prefcore.ops import reference


def _inputs(b: int, t: int, mode: str, estimator: str):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        logprobs = -2.0 + 0.5 * torch.randn(b, t, generator=g)
        ref_logprobs = logprobs + 0.1 * torch.randn(b, t, generator=g)
        lens = torch.randint(t // 4, t + 1, (b,), generator=g)  # right-padded responses
        mask = torch.arange(t)[None] < lens[:, None]
        scores = torch.randn(b, generator=g)
        kwargs = {"kl_coef": 0.05, "estimator": estimator, "mode": mode}
        if mode == "gae":
            kwargs.update(values=torch.randn(b, t, generator=g).to(device), gamma=1.0, lam=0.95)
        else:
            kwargs["group_size"] = 4
        args = tuple(x.to(device) for x in (logprobs, ref_logprobs, mask, scores))
        return args, kwargs
    return make


_GROUP_IMPLS = {
    "prefcore": prefcore.ops.kl_penalized_advantages,
    "reference": reference.kl_penalized_advantages,
    # What an RLOO/GRPO trainer needs: the advantages, and the KL for logging.
    "prefcore[adv+kl]": functools.partial(prefcore.ops.kl_penalized_advantages, outputs=("advantages", "kl")),
}
_GAE_IMPLS = {
    "prefcore": prefcore.ops.kl_penalized_advantages,
    "reference": reference.kl_penalized_advantages,  # reverse Python loop over T
    "reference_vectorized": functools.partial(reference.kl_penalized_advantages, gae_impl="vectorized"),
}

CASES = [
    BenchCase("kl_penalized_advantages", "rloo B=512 T=1024 k=4 k1", _inputs(512, 1024, "rloo", "k1"),
              _GROUP_IMPLS, backward=False, smoke_inputs=_inputs(8, 16, "rloo", "k1"), bound=COPY),
    BenchCase("kl_penalized_advantages", "grpo B=512 T=1024 k=4 k3", _inputs(512, 1024, "grpo", "k3"),
              _GROUP_IMPLS, backward=False, smoke_inputs=_inputs(8, 16, "grpo", "k3"), bound=COPY),
    # Compiling the Python loop would unroll T steps; only the vectorised variant is compiled.
    BenchCase("kl_penalized_advantages", "gae B=512 T=1024 k1 γ=1 λ=0.95", _inputs(512, 1024, "gae", "k1"),
              _GAE_IMPLS, compile=("reference_vectorized",), backward=False, smoke_inputs=_inputs(4, 40, "gae", "k1"), bound=COPY),
    BenchCase("kl_penalized_advantages", "gae B=64 T=4096 k1 γ=1 λ=0.95", _inputs(64, 4096, "gae", "k1"),
              _GAE_IMPLS, compile=("reference_vectorized",), backward=False, smoke_inputs=_inputs(2, 70, "gae", "k1"), bound=COPY),
]
