"""token_logprobs at DESIGN §5 sizes: N=2048, H=512, V=32768 (fp32 and bf16, fwd and fwd+bwd)
and N=8192, H=896, V=151936 (forward only, the reference/old-policy pass of a Qwen-size head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import prefcore
from bench.harness import BenchCase, Bound
from prefcore.ops import reference

CHUNK = 1024  # tokens per chunk of the chunked pure-PyTorch baseline (TRL/verl-style)


def chunked_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The workaround RLHF libraries keep: log_softmax(h @ Wᵀ).gather per chunk of tokens, so only
    a (CHUNK, V) logits block exists at a time (float32 logits)."""
    outs = []
    for start in range(0, hidden.shape[0], CHUNK):
        z = (hidden[start:start + CHUNK] @ weight.T).float()
        t = targets[start:start + CHUNK]
        outs.append(z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1))
    return torch.cat(outs)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused loss as a log-prob: −F.linear_cross_entropy(reduction="none")."""
    return -F.linear_cross_entropy(hidden, weight, targets, reduction="none")


def _flops(args: tuple, kwargs: dict, mode: str) -> float:
    """Nominal flops of the LM-head products: 2·N·H·V forward (z = h·Wᵀ), 6·N·H·V forward and
    backward (plus dh = g·W and dW = gᵀ·h); the softmax's O(N·V) work is not counted."""
    (n, h), v = args[0].shape, args[1].shape[0]
    return (2 if mode == "fwd" else 6) * n * h * v


GEMM = Bound("gemm", _flops)


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, grad: bool):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
        weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_(grad)
        targets = torch.randint(0, v, (n,), generator=g).to(device)
        return (hidden, weight, targets), {}
    return make


def _impls(big: bool) -> dict:
    """At V=151936, N=8192 the eager reference and F.linear_cross_entropy (default options:
    unchunked) each hold ~10 GB of (N, V) float32 logits and log-softmax — more than the 2-core
    CI machine's memory shared with everything else — so that case times the chunked baselines."""
    impls = {"prefcore": prefcore.ops.token_logprobs, "chunked": chunked_reference}
    if not big:
        impls["reference"] = reference.token_logprobs
        if hasattr(F, "linear_cross_entropy"):
            impls["F.linear_cross_entropy"] = linear_cross_entropy
    return impls


CASES = [
    BenchCase("token_logprobs", "N=2048 H=512 V=32768 fp32", _inputs(2048, 512, 32768, torch.float32, True),
              _impls(False), compile=("chunked",), smoke_inputs=_inputs(8, 16, 64, torch.float32, True), bound=GEMM),
    BenchCase("token_logprobs", "N=2048 H=512 V=32768 bf16", _inputs(2048, 512, 32768, torch.bfloat16, True),
              _impls(False), compile=("chunked",), smoke_inputs=_inputs(8, 16, 64, torch.bfloat16, True), bound=GEMM),
    BenchCase("token_logprobs", "N=8192 H=896 V=151936 fp32 fwd", _inputs(8192, 896, 151936, torch.float32, False),
              _impls(True), compile=("chunked",), backward=False, smoke_inputs=_inputs(8, 16, 64, torch.float32, False),
              bound=GEMM),
]
