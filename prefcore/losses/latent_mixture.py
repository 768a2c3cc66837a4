r"""K-annotator latent mixture of Bradley–Terry models, fitted by EM, for pairwise data
without annotator ids (density-estimation paper, eq. 21 and Appendix A.3).

Generative model: each pair ``(a, b)`` is labelled by a latent annotator ``k ~ Cat(π)``
who follows the Luce choice rule with its own reward ``r_k`` (``exp r_k ∝ p*_k``):

.. math:: P(a \succ b) = \sum_k \pi_k\,\sigma(r_k(a) - r_k(b)).

A single BT model fitted to such data is misspecified and puts its mode between the
annotators' modes ("lukewarm coffee"); this model, with the right ``K``, can separate them.

EM on the observed log-likelihood :math:`\sum_i \log\sum_k \pi_k\, p_{ik}`, with
:math:`p_{ik} = \sigma(s_i (r_k(a_i) - r_k(b_i)))` and :math:`s_i = 2y_i - 1`:

- E-step: responsibilities :math:`\gamma_{ik} = \pi_k p_{ik} / \sum_j \pi_j p_{ij}`;
- M-step: :math:`\pi_k = \frac1B\sum_i \gamma_{ik}` (closed form) and a few gradient steps on the
  responsibility-weighted BT loss :math:`\frac1B\sum_i\sum_k \gamma_{ik}\,\mathrm{softplus}(-s_i d_{ik})`
  (generalised EM: each step does not decrease the observed likelihood's lower bound).

The functional pieces work on reward tensors ``(B, K)``; :class:`LatentAnnotatorMixture`
wraps any ``nn.Module`` that maps a batch of items to ``(B, K)`` rewards (an MLP on features,
a transformer with a K-output head, …).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prefcore.losses._validation import (
    REDUCTIONS,
    compute_dtype,
    pair_tensors,
    reduce_pairs,
    require_choice,
    require_floating,
    require_same_device,
    require_tensor,
    shape_str,
)

Items = torch.Tensor | Mapping[str, torch.Tensor]


# ---- functional pieces on (B, K) rewards -------------------------------------------------

def _check_labels(labels: object, batch: int, ref: torch.Tensor) -> torch.Tensor:
    labels = require_tensor(labels, "labels")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape (B,) = ({batch},), got {shape_str(labels.shape)}")
    require_same_device("rewards_a", ref, labels=labels)
    lab = labels.detach()
    if lab.dtype != torch.bool:
        if lab.is_complex():
            raise ValueError(f"labels must be bool or 0/1, got dtype {lab.dtype}")
        bad = (lab != 0) & (lab != 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must be 0 or 1 (1 = a preferred over b), got {lab[i].item()} at labels[{i}]")
    return lab.to(torch.bool)


def _check_rewards(rewards_a: object, rewards_b: object) -> tuple[torch.Tensor, torch.Tensor]:
    rewards_a, rewards_b = pair_tensors("rewards_a", rewards_a, "rewards_b", rewards_b)
    if rewards_a.dim() != 2 or rewards_a.shape[1] < 1:
        raise ValueError(f"rewards_a must have shape (B, K) with K >= 1, got {shape_str(rewards_a.shape)}")
    return rewards_a, rewards_b


def _check_log_weights(log_weights: object, k: int, ref: torch.Tensor) -> torch.Tensor:
    log_weights = require_floating(log_weights, "log_weights")
    if log_weights.shape != (k,):
        raise ValueError(f"log_weights must have shape (K,) = ({k},) to match the rewards, got {shape_str(log_weights.shape)}")
    require_same_device("rewards_a", ref, log_weights=log_weights)
    return log_weights


def latent_mixture_log_likelihoods(rewards_a: torch.Tensor, rewards_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Per-pair, per-annotator log-likelihood of the observed label.

    ``rewards_a, rewards_b (B, K)`` floating: every annotator's reward of each item;
    ``labels (B,)`` bool or 0/1 (1 = ``a`` preferred). Returns ``(B, K)``
    :math:`\log\sigma(s_i (r_{k}(a_i) - r_k(b_i)))`, :math:`s_i = 2y_i - 1`, in float32
    (float64 for float64 rewards); differentiable w.r.t. the rewards.
    """
    rewards_a, rewards_b = _check_rewards(rewards_a, rewards_b)
    lab = _check_labels(labels, rewards_a.shape[0], rewards_a)
    acc = compute_dtype(torch.promote_types(rewards_a.dtype, rewards_b.dtype))
    d = rewards_a.to(acc) - rewards_b.to(acc)
    signed = torch.where(lab[:, None], d, -d)
    return F.logsigmoid(signed)


def latent_mixture_nll(
    rewards_a: torch.Tensor,
    rewards_b: torch.Tensor,
    labels: torch.Tensor,
    log_weights: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Per-pair negative log-likelihood under the latent annotator mixture:

    .. math:: \ell_i = -\log\sum_k \pi_k\,\sigma(s_i(r_k(a_i) - r_k(b_i))),\qquad \pi = \mathrm{softmax}(\text{log\_weights})

    ``log_weights (K,)``: log mixture weights, normalised here (so logits work too).
    ``K = 1`` is exactly :func:`prefcore.losses.bradley_terry_loss`. Evaluated with
    logsumexp of log-sigmoids (stable for any finite rewards). ``reduction``: ``"none"`` →
    ``(B,)``, ``"mean"`` (empty → 0), ``"sum"``. Differentiable w.r.t. rewards and weights.
    """
    ll = latent_mixture_log_likelihoods(rewards_a, rewards_b, labels)
    log_weights = _check_log_weights(log_weights, ll.shape[1], rewards_a)
    require_choice(reduction, "reduction", REDUCTIONS)
    log_pi = torch.log_softmax(log_weights.to(ll.dtype), 0)
    nll = -torch.logsumexp(ll + log_pi, dim=1)
    return reduce_pairs(nll, reduction, torch.promote_types(rewards_a.dtype, rewards_b.dtype))


def latent_mixture_responsibilities(
    rewards_a: torch.Tensor, rewards_b: torch.Tensor, labels: torch.Tensor, log_weights: torch.Tensor
) -> torch.Tensor:
    r"""E-step: posterior over the latent annotator of each pair,
    :math:`\gamma_{ik} = \mathrm{softmax}_k(\log\pi_k + \log p_{ik})`. Returns ``(B, K)``, rows sum to 1,
    detached (responsibilities are constants in the M-step)."""
    with torch.no_grad():
        ll = latent_mixture_log_likelihoods(rewards_a, rewards_b, labels)
        log_weights = _check_log_weights(log_weights, ll.shape[1], rewards_a)
        return torch.softmax(ll + torch.log_softmax(log_weights.to(ll.dtype), 0), dim=1)


def weighted_bradley_terry_loss(
    rewards_a: torch.Tensor,
    rewards_b: torch.Tensor,
    labels: torch.Tensor,
    responsibilities: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""M-step objective: each annotator's BT loss weighted by its responsibility for the pair,
    :math:`\ell_i = \sum_k \gamma_{ik}\,\mathrm{softplus}(-s_i(r_k(a_i) - r_k(b_i)))`.

    ``responsibilities (B, K)`` non-negative (from :func:`latent_mixture_responsibilities`; used
    as constants). Returns ``(B,)`` for ``"none"``, else a scalar.
    """
    ll = latent_mixture_log_likelihoods(rewards_a, rewards_b, labels)
    resp = require_floating(responsibilities, "responsibilities")
    if resp.shape != ll.shape:
        raise ValueError(f"responsibilities must have shape (B, K) = {shape_str(ll.shape)}, got {shape_str(resp.shape)}")
    require_same_device("rewards_a", rewards_a, responsibilities=resp)
    require_choice(reduction, "reduction", REDUCTIONS)
    loss = -(resp.detach().to(ll.dtype) * ll).sum(1)
    return reduce_pairs(loss, reduction, torch.promote_types(rewards_a.dtype, rewards_b.dtype))


def latent_mixture_preference(rewards_a: torch.Tensor, rewards_b: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    r"""Population preference :math:`P(a\succ b) = \sum_k \pi_k\sigma(r_k(a) - r_k(b))`, ``(B,)``."""
    rewards_a, rewards_b = _check_rewards(rewards_a, rewards_b)
    log_weights = _check_log_weights(log_weights, rewards_a.shape[1], rewards_a)
    acc = compute_dtype(torch.promote_types(rewards_a.dtype, rewards_b.dtype))
    pi = torch.softmax(log_weights.to(acc), 0)
    return (torch.sigmoid(rewards_a.to(acc) - rewards_b.to(acc)) * pi).sum(1)


# ---- the module wrapper and its EM loop ---------------------------------------------------

def _num_items(x: Items, name: str) -> int:
    if isinstance(x, torch.Tensor):
        if x.dim() < 1:
            raise ValueError(f"{name} must be batch-first with at least 1 dimension, got {shape_str(x.shape)}")
        return x.shape[0]
    if isinstance(x, Mapping) and x:
        sizes = set()
        for key, v in x.items():
            if not isinstance(v, torch.Tensor) or v.dim() < 1:
                raise ValueError(f"{name}[{key!r}] must be a batch-first tensor, got {type(v).__name__}")
            sizes.add(v.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"all tensors in {name} must share the batch size, got sizes {sorted(sizes)}")
        return sizes.pop()
    raise TypeError(f"{name} must be a tensor or a non-empty mapping of batch-first tensors, got {type(x).__name__}")


def _take(x: Items, idx: torch.Tensor) -> Items:
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)]
    return {k: v[idx.to(v.device)] for k, v in x.items()}


@dataclass
class EMHistory:
    """Trace of :meth:`LatentAnnotatorMixture.fit`: the mean observed NLL of all pairs at each
    E-step (with the parameters before that iteration's M-step), and the weights after it."""

    nll: list[float] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


class LatentAnnotatorMixture(nn.Module):
    r"""Mixture of K Bradley–Terry annotators around any reward model with K outputs.

    ``reward_model``: an ``nn.Module`` mapping a batch of items ``x`` (a tensor, or a mapping
    of batch-first tensors such as tokenizer output) to rewards ``(B, K)``, column ``k`` being
    annotator ``k``'s reward. ``num_annotators`` = K. ``weights``: initial mixture weights
    ``(K,)`` (default uniform); they are a buffer updated in closed form by EM, not by the
    optimiser. ``min_weight`` floors each weight in the π update so a component that loses
    every pair early can still recover (weights renormalised after flooring).

    The components must start different (a randomly initialised reward model does this);
    identical components stay identical under EM.
    """

    def __init__(
        self,
        reward_model: nn.Module,
        num_annotators: int,
        *,
        weights: torch.Tensor | None = None,
        min_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        if not isinstance(reward_model, nn.Module):
            raise TypeError(f"reward_model must be a torch.nn.Module, got {type(reward_model).__name__}")
        if isinstance(num_annotators, bool) or not isinstance(num_annotators, int) or num_annotators < 1:
            raise ValueError(f"num_annotators must be an int >= 1, got {num_annotators!r}")
        if not (isinstance(min_weight, (int, float)) and 0 <= min_weight < 1.0 / num_annotators):
            raise ValueError(f"min_weight must be in [0, 1/K) = [0, {1.0 / num_annotators:.4g}), got {min_weight!r}")
        self.reward_model = reward_model
        self.num_annotators = num_annotators
        self.min_weight = float(min_weight)
        if weights is None:
            log_w = torch.full((num_annotators,), -math.log(num_annotators))
        else:
            weights = require_floating(weights, "weights")
            if weights.shape != (num_annotators,) or not bool((weights > 0).all()):
                raise ValueError(f"weights must be a positive tensor of shape (K,) = ({num_annotators},), got {shape_str(weights.shape)} {weights.tolist()}")
            log_w = torch.log(weights / weights.sum()).float()
        self.register_buffer("log_weights", log_w)

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights π ``(K,)``, summing to 1."""
        return torch.softmax(self.log_weights, 0)

    def rewards(self, x: Items) -> torch.Tensor:
        """Every annotator's reward of each item, ``(B, K)`` (validated)."""
        b = _num_items(x, "x")
        out = self.reward_model(x)
        if not isinstance(out, torch.Tensor) or out.shape != (b, self.num_annotators):
            got = shape_str(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"reward_model must return rewards of shape (B, K) = ({b}, {self.num_annotators}), got {got}")
        return out

    def forward(self, x_a: Items, x_b: Items) -> torch.Tensor:
        """Population preference :math:`P(a\\succ b)`, ``(B,)``."""
        ra, rb = self._pair_rewards(x_a, x_b)
        return latent_mixture_preference(ra, rb, self.log_weights.to(ra.device))

    def nll(self, x_a: Items, x_b: Items, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """Observed-data NLL of the labels (see :func:`latent_mixture_nll`)."""
        ra, rb = self._pair_rewards(x_a, x_b)
        return latent_mixture_nll(ra, rb, labels, self.log_weights.to(ra.device), reduction=reduction)

    @torch.no_grad()
    def responsibilities(self, x_a: Items, x_b: Items, labels: torch.Tensor, *, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """E-step over all pairs (in chunks of ``batch_size``): returns ``(γ (B, K), nll (B,))``."""
        n = self._check_pairs(x_a, x_b, labels)
        chunk = n if not batch_size else batch_size
        resp, nll = [], []
        for start in range(0, max(n, 1), max(chunk, 1)):
            idx = torch.arange(start, min(start + chunk, n))
            ra, rb = self._pair_rewards(_take(x_a, idx), _take(x_b, idx))
            lab = labels[idx.to(labels.device)]
            lw = self.log_weights.to(ra.device)
            resp.append(latent_mixture_responsibilities(ra, rb, lab, lw))
            nll.append(latent_mixture_nll(ra, rb, lab, lw, reduction="none"))
        return torch.cat(resp), torch.cat(nll)

    def em_step(
        self,
        x_a: Items,
        x_b: Items,
        labels: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        m_steps: int = 1,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> float:
        """One generalised-EM iteration: E-step on every pair, closed-form π update, then
        ``m_steps`` optimiser steps on the responsibility-weighted BT loss over minibatches of
        ``batch_size`` pairs (all pairs when None) drawn with ``generator``. ``scheduler`` (if
        given) is stepped after each optimiser step. Returns the mean NLL at the E-step."""
        if isinstance(m_steps, bool) or not isinstance(m_steps, int) or m_steps < 1:
            raise ValueError(f"m_steps must be an int >= 1, got {m_steps!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        n = self._check_pairs(x_a, x_b, labels)
        resp, nll = self.responsibilities(x_a, x_b, labels, batch_size=batch_size)
        if n == 0:
            return 0.0
        # π update: the average responsibility, floored so no annotator is removed for good.
        pi = resp.mean(0).clamp_min(self.min_weight)
        self.log_weights.copy_(torch.log(pi / pi.sum()).to(self.log_weights))
        # The module's train/eval mode is left as the caller set it (dropout in the E-step is the
        # caller's choice).
        for _ in range(m_steps):
            if batch_size is None or batch_size >= n:
                idx = torch.arange(n)
            else:
                idx = torch.randint(0, n, (batch_size,), generator=generator)
            ra, rb = self._pair_rewards(_take(x_a, idx), _take(x_b, idx))
            loss = weighted_bradley_terry_loss(ra, rb, labels[idx.to(labels.device)], resp[idx.to(resp.device)].to(ra.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        return float(nll.mean())

    def fit(
        self,
        x_a: Items,
        x_b: Items,
        labels: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        em_iters: int = 100,
        m_steps: int = 10,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> EMHistory:
        """Run ``em_iters`` iterations of :meth:`em_step`; returns the :class:`EMHistory`."""
        if isinstance(em_iters, bool) or not isinstance(em_iters, int) or em_iters < 0:
            raise ValueError(f"em_iters must be an int >= 0, got {em_iters!r}")
        history = EMHistory()
        for _ in range(em_iters):
            nll = self.em_step(x_a, x_b, labels, optimizer, m_steps=m_steps, batch_size=batch_size,
                               generator=generator, scheduler=scheduler)
            history.nll.append(nll)
            history.weights.append(self.weights.tolist())
        return history

    # -- helpers --
    def _pair_rewards(self, x_a: Items, x_b: Items) -> tuple[torch.Tensor, torch.Tensor]:
        na, nb = _num_items(x_a, "x_a"), _num_items(x_b, "x_b")
        if na != nb:
            raise ValueError(f"x_b must have the batch size of x_a ({na}), got {nb}")
        return self.rewards(x_a), self.rewards(x_b)

    def _check_pairs(self, x_a: Items, x_b: Items, labels: torch.Tensor) -> int:
        na, nb = _num_items(x_a, "x_a"), _num_items(x_b, "x_b")
        if na != nb:
            raise ValueError(f"x_b must have the batch size of x_a ({na}), got {nb}")
        labels = require_tensor(labels, "labels")
        if labels.shape != (na,):
            raise ValueError(f"labels must have shape (B,) = ({na},), got {shape_str(labels.shape)}")
        return na


def latent_mixture_em_step(
    mixture: LatentAnnotatorMixture,
    x_a: Items,
    x_b: Items,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    m_steps: int = 1,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Functional form of :meth:`LatentAnnotatorMixture.em_step`; returns the mean NLL at the E-step."""
    if not isinstance(mixture, LatentAnnotatorMixture):
        raise TypeError(f"mixture must be a LatentAnnotatorMixture, got {type(mixture).__name__}")
    return mixture.em_step(x_a, x_b, labels, optimizer, m_steps=m_steps, batch_size=batch_size, generator=generator)
