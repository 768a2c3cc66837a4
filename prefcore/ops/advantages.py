"""KL-penalised advantages for RLOO, GRPO and PPO (GAE), and masked whitening (DESIGN §3.4).

No autograd: inputs are treated as constants (detached). Also the two layout helpers between
the k-major sample order of TRL's old ``repeat`` and the prompt-major groups the op expects.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from prefcore.ops._checks import (
    opmath_dtype,
    require_choice,
    require_finite_float,
    require_floating,
    require_same_device,
    require_tensor,
    shape_str,
)

KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
ADVANTAGE_MODES = {"rloo": 0, "grpo": 1, "gae": 2}


class Advantages(NamedTuple):
    """Result of :func:`kl_penalized_advantages`: four ``(B, T)`` float32 tensors (a field left
    out through ``outputs=`` is None)."""

    advantages: torch.Tensor
    returns: torch.Tensor | None
    token_rewards: torch.Tensor | None
    kl: torch.Tensor | None


_OUTPUT_BITS = {"advantages": 1, "returns": 2, "token_rewards": 4, "kl": 8}


def _outputs_mask(outputs: object) -> int:
    if outputs is None:
        return 15
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):  # type: ignore[union-attr]
        raise ValueError(f"outputs must be a sequence of output names from {tuple(_OUTPUT_BITS)}, got {outputs!r}")
    unknown = [o for o in outputs if o not in _OUTPUT_BITS]  # type: ignore[union-attr]
    if unknown:
        raise ValueError(f"outputs: unknown name(s) {unknown}; choose from {tuple(_OUTPUT_BITS)}")
    if "advantages" not in outputs:  # type: ignore[operator]
        raise ValueError(f"outputs must include 'advantages', got {tuple(outputs)}")  # type: ignore[arg-type]
    return sum(_OUTPUT_BITS[o] for o in set(outputs))  # type: ignore[union-attr]


def _require_mask(mask: object, shape: torch.Size, ref_name: str) -> torch.Tensor:
    m = require_tensor(mask, "mask")
    if m.dtype.is_complex:
        raise ValueError(f"mask must be a bool or 0/1 tensor, got {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"mask must have the shape of {ref_name} {shape_str(shape)}, got {shape_str(m.shape)}")
    return m


def _require_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _require_unit_interval(value: object, name: str) -> float:
    v = require_finite_float(value, name, min_value=0.0)
    if v > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {v}")
    return v


def kl_penalized_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    mode: str = "rloo",
    group_size: int | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
    kl_clamp: float | None = None,
    outputs: Sequence[str] | None = None,
) -> Advantages:
    r"""Token-level KL penalty, rewards and advantages for RLOO, GRPO or PPO-style GAE, fused.

    Shapes: ``logprobs, ref_logprobs (B, T)`` (policy and reference log-probabilities of the
    sampled tokens); ``mask (B, T)`` bool or 0/1 (valid response tokens; interior zeros allowed);
    ``scores (B,)`` sequence-level rewards; ``values (B, T)`` critic values (``mode="gae"`` only).
    Any floating dtypes (mixed ones are promoted); maths in float32 (float64 for float64 inputs).

    With :math:`d = \text{logprobs} - \text{ref\_logprobs}`:
    ``estimator`` k1 = :math:`d`, k2 = :math:`d^2/2`, k3 = :math:`e^{-d} - 1 + d` (evaluated
    without cancellation for small :math:`|d|`), abs = :math:`|d|`; ``kl_clamp=c`` clamps it to
    :math:`[-c, c]`; ``kl = 0`` where ``mask`` is 0.
    ``token_rewards`` :math:`r_t = -\text{kl\_coef}\cdot kl_t + \text{score}\cdot 1[t = \text{last valid token}]`.

    ``mode="rloo"``: rows form contiguous prompt-major groups of ``group_size = k ≥ 2`` samples
    (rows ``i·k … i·k+k−1`` belong to prompt i; ``B % k == 0``; see
    :func:`k_major_to_prompt_major`). :math:`R_i = \sum_t r_{it}` and
    :math:`A_i = R_i - \frac{1}{k-1}\sum_{j \ne i} R_j`, broadcast over the row's valid tokens.
    ``mode="grpo"``: :math:`A_i = (R_i - \bar R_g)/(\operatorname{std}_g R + 10^{-6})`, unbiased std.
    For both, ``returns`` is that un-whitened per-row advantage on the valid tokens (as verl
    returns it): the signal a critic-free trainer regresses on, and what ``advantages`` equals
    when ``whiten=False``.

    ``mode="gae"``: reverse scan per row, over valid tokens only:
    :math:`\delta_t = r_t + \gamma\,nv - V_t`, :math:`g \leftarrow \delta_t + \gamma\lambda g`,
    :math:`nv \leftarrow V_t`, starting from :math:`g = nv = 0` after the last token; a masked
    token leaves :math:`(g, nv)` unchanged (skipped, not decayed). ``returns = A + V``.
    ``group_size`` must be None; ``values`` is required (and must be None for rloo/grpo).

    ``whiten=True``: ``advantages`` become :math:`(A - \mu)/\sqrt{\sigma^2 + 10^{-8}}` over all
    valid tokens of the batch (unbiased :math:`\sigma^2`; fewer than 2 valid tokens raises
    ``ValueError``). ``returns`` are never whitened (PPO's value target is ``A + V`` before it).
    Across ``torch.distributed`` ranks, whiten in the training layer instead.

    Rows with no valid token get zeros everywhere, never NaN (their :math:`R = 0` still counts
    in their group's baseline). Everything outside ``mask`` is 0. Values under the mask are
    never read into the result (±inf padding is fine).

    Returns :class:`Advantages` ``(advantages, returns, token_rewards, kl)``, each ``(B, T)``
    float32 on the inputs' device. ``outputs`` names the fields to compute (default: all four);
    ``"advantages"`` is required, the others left out are ``None`` in the result and, on CPU, are
    neither allocated nor written — e.g. ``outputs=("advantages", "kl")`` for an RLOO/GRPO trainer
    that logs the KL (for rloo/grpo ``returns`` equals ``advantages`` unless whitening). The values
    computed are identical with or without it. ``gamma`` and ``lam`` lie in [0, 1]; ``kl_coef ≥ 0``.
    On CPU the four outputs are carved from one allocation of torch's CPU allocator (so that
    glibc reuses it from call to call instead of trimming and re-faulting four separate buffers);
    each is its own ordinary, resizable storage at offset 0 and they never overlap, but the
    allocation is freed with the last of them: keeping only one keeps all four's memory alive.
    """
    logprobs = require_floating(logprobs, "logprobs")
    ref_logprobs = require_floating(ref_logprobs, "ref_logprobs")
    scores = require_floating(scores, "scores")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape (B, T), got {shape_str(logprobs.shape)}")
    b, t = logprobs.shape
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {shape_str(logprobs.shape)}, "
                         f"got {shape_str(ref_logprobs.shape)}")
    mask = _require_mask(mask, logprobs.shape, "logprobs")
    if tuple(scores.shape) != (b,):
        raise ValueError(f"scores must have shape (B,) = ({b},), got {shape_str(scores.shape)}")
    est_code = KL_ESTIMATORS[require_choice(estimator, "estimator", tuple(KL_ESTIMATORS))]
    mode_code = ADVANTAGE_MODES[require_choice(mode, "mode", tuple(ADVANTAGE_MODES))]
    kl_coef = require_finite_float(kl_coef, "kl_coef", min_value=0.0)
    gamma = _require_unit_interval(gamma, "gamma")
    lam = _require_unit_interval(lam, "lam")
    if kl_clamp is not None:
        kl_clamp = require_finite_float(kl_clamp, "kl_clamp", min_value=0.0)
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten must be a bool, got {type(whiten).__name__}")
    out_mask = _outputs_mask(outputs)
    if mode == "gae":
        if values is None:
            raise ValueError("mode='gae' needs values of shape (B, T), got None")
        values = require_floating(values, "values")
        if values.shape != logprobs.shape:
            raise ValueError(f"values must have the shape of logprobs {shape_str(logprobs.shape)}, "
                             f"got {shape_str(values.shape)}")
        if group_size is not None:
            raise ValueError(f"group_size is only used by mode='rloo'/'grpo'; pass None for 'gae', got {group_size!r}")
        k = 0
    else:
        if values is not None:
            raise ValueError(f"values is only used by mode='gae'; pass None for {mode!r}")
        if group_size is None:
            raise ValueError(f"mode={mode!r} needs group_size (samples per prompt, >= 2), got None")
        k = _require_int(group_size, "group_size")
        if k < 2:
            raise ValueError(f"group_size must be >= 2 for mode={mode!r} (a baseline needs another sample "
                             f"of the same prompt), got {k}")
        if b % k != 0:
            raise ValueError(f"group_size must divide the batch: logprobs.size(0) = {b} is not a multiple "
                             f"of group_size = {k}")
    require_same_device("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask, scores=scores, values=values)

    dtype = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    if values is not None:
        dtype = torch.promote_types(dtype, values.dtype)
    lp = logprobs.detach().to(dtype)
    ref = ref_logprobs.detach().to(dtype)
    vals = values.detach().to(dtype) if values is not None else None
    sc = scores.detach().to(opmath_dtype(dtype))
    if out_mask == 15:  # the default schema call (what torch.compile traces for the common case)
        out = torch.ops.prefcore.kl_penalized_advantages(lp, ref, mask.detach(), sc, vals, kl_coef, est_code,
                                                          mode_code, k, gamma, lam, whiten, kl_clamp)
        return Advantages(*out)
    out = torch.ops.prefcore.kl_penalized_advantages(lp, ref, mask.detach(), sc, vals, kl_coef, est_code, mode_code,
                                                      k, gamma, lam, whiten, kl_clamp, out_mask)
    return Advantages(*(o if out_mask & (1 << i) else None for i, o in enumerate(out)))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, shift_mean: bool = True) -> torch.Tensor:
    r"""Whiten ``x`` over the elements where ``mask`` is set: :math:`(x - \mu)/\sqrt{\sigma^2 + 10^{-8}}`.

    ``x`` any shape and floating dtype, ``mask`` bool or 0/1 of the same shape. :math:`\mu` and
    :math:`\sigma^2` are taken over the valid elements (unbiased :math:`\sigma^2 = m_2/(n-1)` or
    biased :math:`m_2/n`), reduced in float64 in a fixed order (deterministic). With
    ``shift_mean=False`` the mean is added back, :math:`(x - \mu)/\sqrt{\sigma^2 + 10^{-8}} + \mu`
    (TRL's and verl's convention). Elements outside ``mask`` are 0. Needs at least 2 valid
    elements (1 when ``unbiased=False``), else ``ValueError``. Returns the dtype of ``x``; no autograd.
    """
    x = require_floating(x, "x")
    mask = _require_mask(mask, x.shape, "x")
    for name, flag in (("unbiased", unbiased), ("shift_mean", shift_mean)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {type(flag).__name__}")
    require_same_device("x", x, mask=mask)
    return torch.ops.prefcore.masked_whiten(x.detach(), mask.detach(), unbiased, shift_mean)


def _check_layout_args(x: object, k: object) -> tuple[torch.Tensor, int]:
    x = require_tensor(x, "x")
    k = _require_int(k, "k")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if x.dim() < 1 or x.shape[0] % k != 0:
        raise ValueError(f"x must have a leading dimension divisible by k = {k}, got shape {shape_str(x.shape)}")
    return x, k


def k_major_to_prompt_major(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reorder rows from k-major (TRL's old ``queries.repeat(k, 1)``: row ``j·P + i`` is sample j
    of prompt i) to the prompt-major groups :func:`kl_penalized_advantages` expects (row
    ``i·k + j``). ``x (k·P, *)``; returns a new contiguous tensor of the same shape."""
    x, k = _check_layout_args(x, k)
    p = x.shape[0] // k
    return x.reshape(k, p, *x.shape[1:]).transpose(0, 1).reshape(x.shape).contiguous()


def prompt_major_to_k_major(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`k_major_to_prompt_major`: row ``i·k + j`` → row ``j·P + i``."""
    x, k = _check_layout_args(x, k)
    p = x.shape[0] // k
    return x.reshape(p, k, *x.shape[1:]).transpose(0, 1).reshape(x.shape).contiguous()


# ---- fake (meta) registrations for torch.compile ----------------------------------------

@torch.library.register_fake("prefcore::kl_penalized_advantages")
def _kl_penalized_advantages_fake(logprobs, ref_logprobs, mask, scores, values, kl_coef, estimator, mode,
                                  group_size, gamma, lam, whiten, kl_clamp, outputs=15):
    return tuple(logprobs.new_empty(logprobs.shape if outputs & (1 << i) else (0,), dtype=torch.float32)
                 for i in range(4))


@torch.library.register_fake("prefcore::masked_whiten")
def _masked_whiten_fake(x, mask, unbiased, shift_mean):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
