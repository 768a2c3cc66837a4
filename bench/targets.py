"""Speed-up targets (issue 13), read from the headline (ordinary-process, 2-thread) results.

Each :class:`Target`: prefcore's speed-up over ``baseline`` in ``mode`` for every config of ``op``
whose name contains ``config`` must be at least ``minimum`` in every process (the lowest
per-process ratio is what is compared). Each :class:`LimitTarget` (issue 19): prefcore's rate
over its limit (``bench.harness.Bound``: the GEMM rate or the copy bandwidth measured in the same
process) must be at least ``minimum`` in every process.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    op: str
    config: str  # substring of the case config ("" = every config)
    mode: str
    baseline: str
    minimum: float


@dataclass(frozen=True)
class LimitTarget:
    op: str
    config: str  # substring of the case config ("" = every config)
    mode: str
    minimum: float  # fraction of the limit, e.g. 0.5 = 50%


THREADS = 2
TARGETS: tuple[Target, ...] = (
    Target("pinball_loss", "", "fwd+bwd", "reference", 10.0),
    Target("pinball_loss", "", "fwd+bwd", "reference+compile", 1.5),
    Target("gmm_nll", "", "fwd+bwd", "reference", 5.0),
    Target("gmm_nll", "", "fwd+bwd", "reference+compile", 1.2),
    Target("exp_utility", "", "fwd+bwd", "reference", 3.0),
    Target("exp_utility", "", "fwd+bwd", "reference+compile", 1.0),
    # issue 19: the old "≥ 3× eager" rows timed the allocator (four outputs against eager's one,
    # first-call page faults); with warm-up the op runs near copy bandwidth.
    Target("kl_penalized_advantages", "rloo", "fwd", "reference+compile", 1.0),
    Target("kl_penalized_advantages", "grpo", "fwd", "reference+compile", 1.0),
    Target("kl_penalized_advantages", "gae", "fwd", "reference", 50.0),  # the Python reverse loop
    # issue 10: N=2048, H=512, V=32768, fp32 (eager = log_softmax(h @ Wᵀ).gather)
    Target("token_logprobs", "V=32768 fp32", "fwd", "reference", 1.25),
    Target("token_logprobs", "V=32768 fp32", "fwd", "F.linear_cross_entropy", 1.0),
    Target("token_logprobs", "V=32768 fp32", "fwd+bwd", "reference", 1.0),
    Target("token_logprobs", "V=32768 fp32", "fwd+bwd", "F.linear_cross_entropy", 1.0),
)
LIMIT_TARGETS: tuple[LimitTarget, ...] = (
    LimitTarget("kl_penalized_advantages", "rloo", "fwd", 0.5),
    LimitTarget("kl_penalized_advantages", "grpo", "fwd", 0.5),
)
