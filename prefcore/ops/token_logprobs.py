"""Fused token log-probabilities and entropy from hidden states × LM head (DESIGN §3.5)."""
from __future__ import annotations

import math

import torch

from prefcore.ops._checks import (
    opmath_dtype,
    require_bool,
    require_floating,
    require_same_device,
    require_tensor,
    shape_str,
)

TARGET_DTYPES = (torch.int64, torch.int32)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Log-probability of each target token (and the entropy) under ``softmax(hidden·weightᵀ/T)``,
    without ever building the ``(N, V)`` logits.

    Shapes: ``hidden (*, H)``; ``weight (V, H)`` (the LM head, same floating dtype as
    ``hidden``); ``targets (*,)`` int64 (int32 accepted); ``mask (*,)`` bool, optional
    (True = compute this token).

    With :math:`z = \text{hidden}\cdot\text{weight}^\top / T` accumulated in float32 (float64
    for float64 inputs):
    :math:`\text{logprob} = z_{\text{target}} - \operatorname{logsumexp}_v z_v` and
    :math:`\text{entropy} = \operatorname{logsumexp}_v z_v - \sum_v \operatorname{softmax}(z)_v\, z_v`
    (so :math:`\text{logprob} \le 0` and :math:`0 \le \text{entropy} \le \log V`).

    Returns ``logprobs (*,)`` float32 (float64 for float64 inputs), or ``(logprobs, entropy)``
    with ``return_entropy=True``. Masked positions are 0 in both outputs, are never computed
    (the kernel gathers the valid tokens first — prompts and padding are most of a rollout),
    get zero gradient, and their target ids are ignored even when out of range.

    Differentiable w.r.t. ``hidden`` and ``weight`` (only those that require grad), from the
    gradients of both outputs: with :math:`p = \operatorname{softmax}(z)`, :math:`\mu = \sum_v p_v z_v`,
    :math:`\partial L/\partial z_v = g_\ell(1[v=t] - p_v) - g_H\, p_v (z_v - \mu)`, then
    :math:`\partial L/\partial \text{hidden} = (\partial L/\partial z)\,\text{weight}/T` and
    :math:`\partial L/\partial \text{weight} = (\partial L/\partial z)^\top\text{hidden}/T`.
    The forward saves only the per-token log-sum-exp (and the entropy); the backward
    recomputes each logits tile. Higher-order gradients are not supported (raises).

    Implementation (CPU): the valid tokens are cut into blocks of ≤ 256 rows and the vocabulary
    into tiles of 512 weight rows; each 256 × 512 tile of products comes from ``at::mm`` (MKL)
    into a 512 KiB per-thread buffer and is consumed while in L2 — online log-sum-exp and
    target gather in the forward (a single streaming pass, also without grad), or turned into
    ``∂L/∂z`` in place for the two gradient products in the backward. 256 rows keep each
    product long enough for BLAS to run near peak; 512 vocabulary rows keep a tile's
    ``grad_weight`` accumulator (512 × H float32) in cache across token blocks. A backward
    that needs ``grad_weight`` splits the vocabulary between threads, each with its own
    float32 ``(n, H)`` ``grad_hidden`` partial. bfloat16/float16 are computed in float32.
    CUDA: the same tiles, with cuBLAS products and fused epilogue kernels (see
    ``csrc/cuda/token_logprobs.cu``). bfloat16/float16 logits come from cuBLAS products with a
    float32 output; ``∂L/∂z`` is kept in float32 for every input dtype (with a mean loss over
    many tokens it is ~1e-9, below float16's smallest subnormal) and both gradient products run
    in float32, the bfloat16/float16 operand tiles widened (needs torch >= 2.8).

    Precision of the float32 products on CUDA: they follow torch's float32 matmul setting
    (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``), so
    they are full float32 by default and TF32 (10 mantissa bits, ~1e-3 relative logits error)
    only if the caller enabled it for all their float32 matmuls; the op does not override it.

    Errors (``ValueError``, or ``RuntimeError`` from the kernel for a bad target value):
    hidden-size mismatch, dtype or device mismatch, targets/mask shape, non-integer targets,
    a target outside ``[0, V)`` on a valid token, ``temperature ≤ 0`` or not finite.
    """
    hidden = require_floating(hidden, "hidden")
    weight = require_floating(weight, "weight")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape (*, H) with at least 1 dimension, got {shape_str(hidden.shape)}")
    lead, h = tuple(hidden.shape[:-1]), hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must have shape (V, H) = (V, {h}) to match hidden {shape_str(hidden.shape)}, "
                         f"got {shape_str(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one vocabulary row (V >= 1), got {shape_str(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    targets = require_tensor(targets, "targets")
    if targets.dtype not in TARGET_DTYPES:
        raise ValueError(f"targets must be an integer tensor (int64 or int32), got {targets.dtype}")
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets must have shape (*,) = {shape_str(lead)} to match hidden {shape_str(hidden.shape)}, "
                         f"got {shape_str(targets.shape)}")
    if mask is not None:
        mask = require_bool(mask, "mask")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have shape (*,) = {shape_str(lead)} to match hidden {shape_str(hidden.shape)}, "
                             f"got {shape_str(mask.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    require_same_device("hidden", hidden, weight=weight, targets=targets, mask=mask)

    n = 1
    for s in lead:
        n *= s
    mask2 = mask.reshape(n) if mask is not None else None
    lp, ent, _ = torch.ops.prefcore.token_logprobs(hidden.reshape(n, h), weight, targets.reshape(n), mask2,
                                                   temperature, return_entropy)
    if return_entropy:
        return lp.reshape(lead), ent.reshape(lead)
    return lp.reshape(lead)


# ---- autograd and fake (meta) registrations -------------------------------------------

@torch.library.register_fake("prefcore::token_logprobs")
def _token_logprobs_fake(hidden, weight, targets, mask, temperature, return_entropy):
    n, acc = hidden.shape[0], opmath_dtype(hidden.dtype)
    lp = hidden.new_empty((n,), dtype=acc)
    ent = hidden.new_empty((n if return_entropy else 0,), dtype=acc)
    lse = hidden.new_empty((n,), dtype=acc)
    return lp, ent, lse


@torch.library.register_fake("prefcore::_token_logprobs_backward")
def _token_logprobs_backward_fake(grad_logprobs, grad_entropy, hidden, weight, targets, mask, lse, entropy,
                                  temperature, need_hidden_grad, need_weight_grad):
    gh = hidden.new_empty(hidden.shape) if need_hidden_grad else hidden.new_empty((0,))
    gw = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty((0,))
    return gh, gw


def _token_logprobs_setup_context(ctx, inputs, output):
    hidden, weight, targets, mask, temperature, return_entropy = inputs
    _, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero (N,) gradients for unused outputs
    ctx.temperature = temperature
    ctx.return_entropy = return_entropy
    ctx.save_for_backward(hidden, weight, targets, mask, lse, ent)


def _token_logprobs_backward(ctx, grad_lp, grad_ent, _grad_lse):
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not ctx.return_entropy:
        grad_ent = None
    if (grad_lp is None and grad_ent is None) or not (need_h or need_w):
        return None, None, None, None, None, None
    hidden, weight, targets, mask, lse, ent = ctx.saved_tensors
    if grad_lp is None:
        grad_lp = torch.zeros_like(lse)
    gh, gw = torch.ops.prefcore._token_logprobs_backward(grad_lp, grad_ent, hidden, weight, targets, mask, lse, ent,
                                                         ctx.temperature, need_h, need_w)
    return (gh if need_h else None), (gw if need_w else None), None, None, None, None


torch.library.register_autograd("prefcore::token_logprobs", _token_logprobs_backward,
                                setup_context=_token_logprobs_setup_context)


def _no_double_backward_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError("prefcore.ops.token_logprobs: double backward (gradients of its gradients) is not supported")


torch.library.register_autograd("prefcore::_token_logprobs_backward", _no_double_backward,
                                setup_context=_no_double_backward_setup)
