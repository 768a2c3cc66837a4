"""Quantile op family: the pinball (quantile-Huber) loss and exponential utility (DESIGN §3.1, §3.3)."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from prefcore.ops._checks import (
    opmath_dtype,
    require_bool,
    require_choice,
    require_finite_float,
    require_floating,
    require_same_device,
    shape_str,
)

REDUCTIONS = ("none", "mean", "sum")
UTILITY_KINDS = {"utility": 0, "ce": 1}


def pinball_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    taus: torch.Tensor,
    target_mask: torch.Tensor | None = None,
    *,
    kappa: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Pinball (quantile) loss, or quantile-Huber loss for ``kappa > 0``, fused.

    Shapes: ``pred (*, Q)``; ``taus (Q,)`` each strictly inside (0, 1), any order;
    ``target (*,)`` (one score per row) or ``(*, N)`` (N annotator scores per row);
    ``target_mask`` bool with the shape of ``target``, optional (True = valid).

    With ``u = target_n − pred_q``:
    ``κ = 0``: :math:`\rho(u) = u(\tau - 1[u<0])`;
    ``κ > 0``: :math:`\rho(u) = |\tau - 1[u<0]|\,H_\kappa(u)/\kappa`, with
    :math:`H_\kappa(u) = u^2/2` if :math:`|u| \le \kappa` else :math:`\kappa(|u| - \kappa/2)`.
    Row loss :math:`\ell = \frac1Q \sum_q \frac1{N_{valid}} \sum_n \rho(u_{nq})`; a row with no
    valid target has loss 0 and is left out of ``"mean"`` (the mean over zero rows is 0, so an
    all-masked batch yields a zero loss and zero gradient rather than NaN).

    Returns ``(*,)`` for ``reduction="none"``, else a scalar; dtype of ``pred`` (accumulated
    in float32, float64 for float64). Differentiable w.r.t. ``pred`` only; at ``u = 0`` the
    κ = 0 gradient is ``−τ`` (the indicator is strict). When ``pred`` requires grad, the
    gradient is computed in the same pass as the loss. ``target`` and ``taus`` are read in
    float32 (float64 for float64 ``pred``), so float32 scores keep full precision with a
    bfloat16 ``pred``.

    ``kappa`` so small that ``1/κ`` overflows the accumulation dtype (below ~2.9e-39 in float32,
    i.e. subnormal; ~5.6e-309 in float64) is taken as ``κ = 0``: the plain pinball loss, the
    κ → 0 limit (the two differ by at most κ/2 per pair). Terms are scaled by
    ``1/(N_valid·Q)`` before the sum over quantiles, so a row whose mean is representable never
    overflows on the way (a per-quantile sum that overflows is redone term by term).

    Non-finite values: ``taus`` and ``kappa`` must be finite (``ValueError`` / ``RuntimeError``
    naming them). Non-finite ``pred`` or ``target`` values propagate by IEEE arithmetic to
    exactly the rows that hold them (``±∞`` → ``+∞`` loss, ``∞ − ∞`` or NaN → NaN) and to no
    other row (a ``"mean"``/``"sum"`` is then non-finite too); a masked-out target is never
    read, so a NaN there changes nothing.

    Higher-order gradients: a backward run with ``create_graph=True`` (double backward,
    ``torch.autograd.functional.hessian``) differentiates the pure-PyTorch reference instead of
    the fused kernel, so second and higher derivatives are the true ones (the Hessian is
    diagonal, ``Σ_n w·1[|u| ≤ κ]/(κ·N_valid·Q)`` for κ > 0, and 0 for the piecewise-linear
    κ = 0 loss). That path materialises ``(*, N, Q)``; first-order gradients stay fused.
    """
    pred = require_floating(pred, "pred")
    target = require_floating(target, "target")
    if pred.dim() < 1:
        raise ValueError(f"pred must have shape (*, Q) with at least 1 dimension, got {shape_str(pred.shape)}")
    lead, q = tuple(pred.shape[:-1]), pred.shape[-1]
    if q < 1:
        raise ValueError(f"pred must have at least one quantile (Q >= 1), got shape {shape_str(pred.shape)}")
    acc = opmath_dtype(pred.dtype)
    taus = torch.as_tensor(taus, dtype=acc, device=pred.device) if not isinstance(taus, torch.Tensor) else taus
    taus = require_floating(taus, "taus")
    if taus.dim() != 1 or taus.shape[0] != q:
        raise ValueError(f"taus must have shape (Q,) = ({q},) to match pred {shape_str(pred.shape)}, got {shape_str(taus.shape)}")
    if tuple(target.shape) == lead:
        n_cols = 1
    elif target.dim() == pred.dim() and tuple(target.shape[:-1]) == lead:
        n_cols = target.shape[-1]
    else:
        raise ValueError(
            f"target must have shape (*,) = {shape_str(lead)} or (*, N) = {shape_str(lead + ('N',))} "
            f"to match pred {shape_str(pred.shape)}, got {shape_str(target.shape)}"
            if lead else
            f"target must have shape () or (N,) to match pred {shape_str(pred.shape)}, got {shape_str(target.shape)}"
        )
    if target_mask is not None:
        target_mask = require_bool(target_mask, "target_mask")
        if target_mask.shape != target.shape:
            raise ValueError(f"target_mask must have the shape of target {shape_str(target.shape)}, got {shape_str(target_mask.shape)}")
    kappa = require_finite_float(kappa, "kappa", min_value=0.0)
    require_choice(reduction, "reduction", REDUCTIONS)
    require_same_device("pred", pred, target=target, taus=taus, target_mask=target_mask)

    rows = 1
    for s in lead:
        rows *= s
    pred2 = pred.reshape(rows, q)
    target2 = target.to(acc).reshape(rows, n_cols)
    mask2 = target_mask.reshape(rows, n_cols) if target_mask is not None else None
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    row_loss, _ = torch.ops.prefcore.pinball_loss(pred2, target2, taus.to(acc), mask2, kappa, need_grad)
    if need_grad and not torch.compiler.is_compiling() and row_loss.grad_fn is not None:
        # The fused forward's d row_loss / d pred output is dropped here, so only the autograd
        # node holds it and its backward may scale it in place (no second (R, Q) buffer). A
        # direct caller of torch.ops.prefcore.pinball_loss keeps that output and never sets this.
        row_loss.grad_fn._prefcore_dpred_private = True
    return _reduce_rows(row_loss, mask2, reduction, lead, pred.dtype)


def _reduce_rows(
    row_loss: torch.Tensor,
    mask2: torch.Tensor | None,
    reduction: str,
    lead: tuple[int, ...],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Reduce per-row losses ``(R,)``; rows whose mask is all False are left out of the mean."""
    if reduction == "none":
        return row_loss.reshape(lead).to(out_dtype)
    total = row_loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    if mask2 is None:
        count = torch.tensor(float(max(row_loss.shape[0], 1)), dtype=row_loss.dtype, device=row_loss.device)
    else:
        count = mask2.any(-1).sum().to(row_loss.dtype).clamp_min(1.0)
    return (total / count).to(out_dtype)


def exp_utility(
    quantiles: torch.Tensor,
    lam: float | torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    kind: str = "ce",
) -> torch.Tensor:
    r"""Risk-aware scalarisation of a quantile distribution (QRM eq. 3–4), fused.

    Shapes: ``quantiles (B, Q)``, or ``(B, M, Q)`` with ``gate (B, M)``, which are mixed
    first: :math:`Q^{mix}_q = \sum_m g_m Q_{mq}` (plain broadcast; no ``M == Q`` assumption,
    and the gate is not required to sum to 1). ``lam`` is a float or a ``(B,)`` tensor.

    ``kind="utility"``: :math:`U = -\frac1Q\sum_q e^{-\lambda Q_q}` (QRM eq. 4).
    ``kind="ce"`` (certainty equivalent, in reward units):
    :math:`CE = -\frac1\lambda(\operatorname{logsumexp}_q(-\lambda Q_q) - \log Q)`.
    ``λ = 0`` gives the mean exactly, ``λ > 0`` is risk-averse (→ min as λ → ∞), ``λ < 0``
    risk-seeking (→ max). For small ``|λ|`` the CE is evaluated as
    ``mean − log1p(mean(expm1(z)))/λ`` so it stays accurate instead of cancelling.

    Returns ``(B,)`` in the dtype of ``quantiles``. Differentiable w.r.t. ``quantiles`` and
    ``gate`` (not ``lam``), first order only: a double backward (``create_graph=True`` and a
    second ``backward``, e.g. ``torch.autograd.functional.hessian``) raises ``RuntimeError``.

    Edge cases (decided, tested): a gate with ``M = 0`` attributes is the empty mixture,
    :math:`Q^{mix} = 0` on every quantile (what the plain sum gives), so the result is the
    utility of zeros for any λ — ``−1`` for ``"utility"``, ``0`` for ``"ce"`` — and both
    gradients are empty. ``lam`` must be finite: a non-finite float or any NaN/±inf entry of a
    ``lam`` tensor raises ``ValueError`` naming the row and value (this reads ``lam``: a device
    sync on CUDA). Non-finite ``quantiles`` or ``gate`` entries propagate to their own rows only.
    Large finite inputs give finite results unless a row's own ``λ·(Q_q − mean)`` overflows.
    """
    quantiles = require_floating(quantiles, "quantiles")
    code = UTILITY_KINDS[require_choice(kind, "kind", tuple(UTILITY_KINDS))]
    acc = opmath_dtype(quantiles.dtype)
    if gate is not None:
        gate = require_floating(gate, "gate")
        if quantiles.dim() != 3:
            raise ValueError(f"quantiles must have shape (B, M, Q) when gate is given, got {shape_str(quantiles.shape)}")
        b, m, _ = quantiles.shape
        if tuple(gate.shape) != (b, m):
            raise ValueError(f"gate must have shape (B, M) = ({b}, {m}) to match quantiles {shape_str(quantiles.shape)}, got {shape_str(gate.shape)}")
        if gate.dtype != quantiles.dtype:
            raise ValueError(f"gate must have the dtype of quantiles ({quantiles.dtype}), got {gate.dtype}")
    elif quantiles.dim() != 2:
        raise ValueError(f"quantiles must have shape (B, Q) (or (B, M, Q) with gate), got {shape_str(quantiles.shape)}")
    b, q = quantiles.shape[0], quantiles.shape[-1]
    if q < 1:
        raise ValueError(f"quantiles must have at least one quantile (Q >= 1), got shape {shape_str(quantiles.shape)}")
    if isinstance(lam, torch.Tensor):
        lam = require_floating(lam, "lam")
        if lam.dim() == 0:
            lam = lam.reshape(1)
        if lam.dim() != 1 or lam.shape[0] not in (b, 1):
            raise ValueError(f"lam must be a float or a tensor of shape (B,) = ({b},), got {shape_str(lam.shape)}")
        lam_t = lam.detach().to(acc)
        # The device first: a lam elsewhere (e.g. on the meta device, whose values cannot be
        # read) is named here rather than failing inside the finiteness check.
        require_same_device("quantiles", quantiles, gate=gate, lam=lam_t)
        _require_finite_lam(lam_t)
    else:
        lam_t = torch.full((1,), require_finite_float(lam, "lam"), dtype=acc, device=quantiles.device)
        require_same_device("quantiles", quantiles, gate=gate)
    return torch.ops.prefcore.exp_utility(quantiles, lam_t, gate, code)


def _require_finite_lam(lam: torch.Tensor) -> None:
    """ValueError naming the first row whose ``lam`` is NaN or ±inf (as for a float ``lam``)."""
    if is_fake(lam) or lam.is_meta or lam.numel() == 0:  # no values to read (shapes only)
        return
    bad = ~torch.isfinite(lam)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"lam must be finite, got {lam[row].item()} at row {row} of the (B,) lam tensor")


# ---- autograd and fake (meta) registrations -------------------------------------------

@torch.library.register_fake("prefcore::pinball_loss")
def _pinball_loss_fake(pred, target, taus, target_mask, kappa, need_grad):
    loss = pred.new_empty((pred.shape[0],), dtype=opmath_dtype(pred.dtype))
    dpred = pred.new_empty(pred.shape) if need_grad else pred.new_empty((0,))
    return loss, dpred


@torch.library.register_fake("prefcore::_pinball_loss_backward")
def _pinball_loss_backward_fake(grad_rows, pred, target, taus, target_mask, kappa):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _pinball_setup_context(ctx, inputs, output):
    pred, target, taus, target_mask, kappa, need_grad = inputs
    _, dpred = output
    ctx.mark_non_differentiable(dpred)
    ctx.set_materialize_grads(False)  # never build a zero (R, Q) gradient for the dpred output
    ctx.kappa = kappa
    # The fused forward already produced d row_loss / d pred; it has no grad_fn, so it is kept
    # on ctx (no reference cycle) and reused by the first backward. It is scaled in place only
    # when the pinball_loss wrapper marked it private (it dropped the output); a tensor the
    # caller still holds is never modified. A repeated backward (retain_graph=True) recomputes.
    ctx.dpred = dpred if need_grad else None
    ctx._prefcore_dpred_private = False
    ctx.save_for_backward(pred, target, taus, target_mask)


def _pinball_backward(ctx, grad_loss, _grad_dpred):
    if grad_loss is None:  # grads are not materialised: nothing flowed into the loss output
        return None, None, None, None, None, None
    target_mask = ctx.saved_tensors[3]
    if target_mask is not None:
        # A row with no valid target has loss 0 and gradient 0 whatever its upstream gradient
        # (as the kernels' backward op writes): an inf/NaN grad_loss times its zero dpred row
        # would be NaN.
        grad_loss = grad_loss.masked_fill(~target_mask.any(-1), 0)
    if torch.is_grad_enabled():
        # create_graph=True (double backward, Hessians): differentiate the pure-PyTorch twin, so
        # second and higher derivatives are the true ones. Materialises (R, N, Q); the
        # first-order path below stays fused.
        pred, target, taus, target_mask = ctx.saved_tensors
        ctx.dpred = None
        return (_pinball_grad_differentiable(grad_loss, pred, target, taus, target_mask, ctx.kappa),
                None, None, None, None, None)
    if ctx.dpred is not None:
        dpred, ctx.dpred = ctx.dpred, None
        if is_fake(dpred) or not ctx._prefcore_dpred_private:
            # Traced (functional graphs cannot mutate a forward output), or the caller holds dpred.
            grad_pred = (grad_loss.unsqueeze(-1) * dpred).to(dpred.dtype)
        else:
            grad_pred = dpred.mul_(grad_loss.unsqueeze(-1))
    else:
        pred, target, taus, target_mask = ctx.saved_tensors
        grad_pred = torch.ops.prefcore._pinball_loss_backward(grad_loss, pred, target, taus, target_mask, ctx.kappa)
    return grad_pred, None, None, None, None, None


def _pinball_grad_differentiable(
    grad_rows: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    taus: torch.Tensor,
    target_mask: torch.Tensor | None,
    kappa: float,
) -> torch.Tensor:
    """``grad_rows · ∂row_loss/∂pred`` as a differentiable graph (through the reference twin),
    for backward passes run with ``create_graph=True``."""
    from prefcore.ops import reference

    with torch.enable_grad():
        rows = reference.pinball_loss(pred.to(opmath_dtype(pred.dtype)), target, taus, target_mask,
                                      kappa=kappa, reduction="none")
        (grad_pred,) = torch.autograd.grad(rows, pred, grad_outputs=grad_rows, create_graph=True)
    return grad_pred


torch.library.register_autograd("prefcore::pinball_loss", _pinball_backward, setup_context=_pinball_setup_context)


@torch.library.register_fake("prefcore::exp_utility")
def _exp_utility_fake(quantiles, lam, gate, kind):
    return quantiles.new_empty((quantiles.shape[0],))


@torch.library.register_fake("prefcore::_exp_utility_backward")
def _exp_utility_backward_fake(grad, quantiles, lam, gate, kind):
    grad_q = torch.empty_like(quantiles, memory_format=torch.contiguous_format)
    grad_gate = quantiles.new_empty(gate.shape) if gate is not None else quantiles.new_empty((0,))
    return grad_q, grad_gate


def _exp_utility_setup_context(ctx, inputs, output):
    quantiles, lam, gate, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(quantiles, lam, gate)


def _exp_utility_backward(ctx, grad):
    quantiles, lam, gate = ctx.saved_tensors
    grad_q, grad_gate = torch.ops.prefcore._exp_utility_backward(grad, quantiles, lam, gate, ctx.kind)
    return grad_q, None, (grad_gate if gate is not None else None), None


torch.library.register_autograd("prefcore::exp_utility", _exp_utility_backward, setup_context=_exp_utility_setup_context)


def _exp_utility_double_backward(ctx, grad_q, grad_gate):
    raise RuntimeError("exp_utility supports first-order gradients only: double backward (a gradient of its "
                       "gradient, e.g. torch.autograd.functional.hessian or create_graph=True followed by "
                       "another backward) is not implemented; use prefcore.ops.reference.exp_utility for that")


# Registered so that a graph built with create_graph=True records the backward op and the second
# backward fails loudly, instead of torch treating its outputs as constants (silent zeros).
torch.library.register_autograd("prefcore::_exp_utility_backward", _exp_utility_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
