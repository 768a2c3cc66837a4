"""Pure-PyTorch reference implementations of every prefcore op (same signatures).

For tests and benchmarks only — the package never falls back to these. They are written
the obvious way (materialising broadcasts) and compute in the dtype of their inputs, so a
reference call in bfloat16 is "plain PyTorch in low precision", the baseline the tolerance
rule in the tests compares against.
"""
from __future__ import annotations

import math

import torch

# ---- quantile family (DESIGN §3.1, §3.3) ------------------------------------------------


def pinball_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    taus: torch.Tensor,
    target_mask: torch.Tensor | None = None,
    *,
    kappa: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference of :func:`prefcore.ops.pinball_loss`; builds the ``(*, N, Q)`` broadcast.

    Agrees with the fused op on the edge cases its docstring states: a ``kappa`` whose
    reciprocal overflows the accumulation dtype is taken as 0, and masked-out targets are
    never used (a NaN there does not reach the row)."""
    dtype = pred.dtype
    kappa = _effective_kappa(kappa, dtype)
    t = target.to(dtype)
    if t.dim() == pred.dim() - 1:
        t = t.unsqueeze(-1)
        target_mask = target_mask.unsqueeze(-1) if target_mask is not None else None
    if target_mask is not None:
        t = torch.where(target_mask, t, torch.zeros_like(t))  # masked values are not read
    taus = torch.as_tensor(taus, dtype=dtype, device=pred.device)
    u = t.unsqueeze(-1) - pred.unsqueeze(-2)  # (*, N, Q)
    below = (u < 0).to(dtype)
    if kappa == 0:
        rho = u * (taus - below)
    else:
        a = u.abs()
        huber = torch.where(a <= kappa, 0.5 * u * u, kappa * (a - 0.5 * kappa))
        rho = (taus - below).abs() * huber / kappa
    per_target = rho.mean(-1)  # (*, N)
    if target_mask is None:
        valid = torch.ones_like(per_target)
    else:
        valid = target_mask.to(dtype)
    n_valid = valid.sum(-1)
    row = torch.where(valid > 0, per_target, torch.zeros_like(per_target)).sum(-1) / n_valid.clamp_min(1)
    row = torch.where(n_valid > 0, row, torch.zeros_like(row))
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / (n_valid > 0).sum().clamp_min(1).to(dtype)


def _effective_kappa(kappa: float, dtype: torch.dtype) -> float:
    """``kappa`` as the fused op uses it: 0 where 1/κ overflows the accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    k = float(torch.tensor(kappa, dtype=acc))
    if k <= 0.0 or 1.0 / k > torch.finfo(acc).max:
        return 0.0
    return kappa


def exp_utility(
    quantiles: torch.Tensor,
    lam: float | torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    kind: str = "ce",
) -> torch.Tensor:
    """Reference of :func:`prefcore.ops.exp_utility` (plain logsumexp; no small-λ care). Same
    contract for the edge cases: M = 0 gives the utility of zeros, non-finite ``lam`` raises."""
    x = (gate.unsqueeze(-1) * quantiles).sum(-2) if gate is not None else quantiles
    if not isinstance(lam, torch.Tensor):  # a Python number: no tensor read (no graph break when compiled)
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
    elif bool((~torch.isfinite(lam.detach())).any()):
        row = int((~torch.isfinite(lam.detach().reshape(-1))).nonzero()[0, 0])
        raise ValueError(f"lam must be finite, got {lam.detach().reshape(-1)[row].item()} at row {row}")
    lam_t = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    lam_col = lam_t.reshape(-1, 1) if lam_t.dim() == 1 else lam_t
    if kind == "utility":
        return -torch.exp(-lam_col * x).mean(-1)
    lam_row = lam_col.reshape(-1) if lam_t.dim() == 1 else lam_t
    is_zero = lam_row == 0
    safe_col = torch.where(lam_col == 0, torch.ones_like(lam_col), lam_col)
    safe_row = torch.where(is_zero, torch.ones_like(lam_row), lam_row)
    ce = -(torch.logsumexp(-safe_col * x, dim=-1) - math.log(x.shape[-1])) / safe_row
    return torch.where(is_zero, x.mean(-1), ce)


# ---- Gaussian-mixture family (DESIGN §3.2) ----------------------------------------------


def gmm_nll(
    logits: torch.Tensor,
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    points: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    normalize_grid: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference of :func:`prefcore.ops.gmm_nll`; builds the ``(*, K, G|N)`` broadcast.

    Raises ``ValueError`` for the values the fused op rejects (non-finite parameters, points or
    weights, negative weights, ``log_sigma`` below the accumulation dtype's limit), naming the
    argument, row and value; the check is skipped while ``torch.compile`` traces."""
    if not torch.compiler.is_compiling():
        _check_gmm_values(logits, mu, log_sigma, points, weights)
    dtype = logits.dtype
    x = points.to(dtype)
    log_pi = torch.log_softmax(logits, dim=-1)
    z = (x.unsqueeze(-2) - mu.unsqueeze(-1)) / torch.exp(log_sigma).unsqueeze(-1)  # (*, K, P)
    comp = (log_pi - log_sigma - 0.5 * math.log(2 * math.pi)).unsqueeze(-1) - 0.5 * z * z
    log_p = torch.logsumexp(comp, dim=-2)  # (*, P)
    if normalize_grid:
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    w = torch.ones_like(log_p) if weights is None else weights.to(dtype).expand_as(log_p)
    total = w.sum(-1)
    has_weight = total > 0
    row = -(w * log_p).sum(-1) / torch.where(has_weight, total, torch.ones_like(total))
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / has_weight.sum().clamp_min(1).to(dtype)


def _check_gmm_values(logits, mu, log_sigma, points, weights) -> None:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    min_log_sigma = -700.0 if acc == torch.float64 else -80.0

    def first_bad(name: str, t: torch.Tensor, bad: torch.Tensor, what: str) -> None:
        if t.numel() and bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            where = f"row {', '.join(map(str, idx[:-1]))} (column {idx[-1]})" if len(idx) > 1 else f"column {idx[0]}"
            raise ValueError(f"{name} must be {what}, got {t[idx].item()} at {where}")

    for name, t in (("logits", logits), ("mu", mu), ("log_sigma", log_sigma), ("points", points)):
        first_bad(name, t, ~torch.isfinite(t), "finite")
    first_bad("log_sigma", log_sigma, log_sigma < min_log_sigma, f">= {min_log_sigma}")
    if weights is not None:
        w = weights.to(acc)
        first_bad("weights", w, ~torch.isfinite(w) | (w < 0), "finite and non-negative")
        totals = w.sum(-1) if w.dim() else w
        if not bool(torch.isfinite(totals).all()):
            raise ValueError("weights must have a finite sum per row (each row is normalised to sum 1)")


# ---- KL-penalised advantages (DESIGN §3.4) ----------------------------------------------

from prefcore.ops.advantages import Advantages  # noqa: E402  (the op's result type, shared)

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
ADVANTAGE_MODES = ("rloo", "grpo", "gae")
WHITEN_EPS = 1e-8
GRPO_EPS = 1e-6


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k1",
    kl_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL estimate of ``d = logprobs − ref_logprobs`` (k1 = d, k2 = d²/2,
    k3 = exp(−d) − 1 + d, abs = |d|), clamped to ``[−c, c]`` and 0 where ``mask`` is 0
    (selected, so ±inf/NaN under the mask never leak)."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = torch.exp(-d) - 1 + d
    elif estimator == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if kl_clamp is not None:
        kl = kl.clamp(-kl_clamp, kl_clamp)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def token_rewards(kl: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """``−kl_coef·kl + scores·1[t = last valid token]``, 0 outside ``mask`` (vectorised: the last
    valid index is the argmax of ``t·mask``; rows with no valid token get no score)."""
    m = mask.bool()
    t_idx = torch.arange(m.shape[-1], device=m.device)
    last = torch.where(m, t_idx, -1).amax(-1, keepdim=True) if m.shape[-1] else torch.full(m.shape[:-1] + (1,), -1, device=m.device)
    is_last = (t_idx == last) & m
    r = torch.where(m, -kl_coef * kl, torch.zeros_like(kl))
    return r + torch.where(is_last, scores.to(kl.dtype)[:, None], torch.zeros_like(kl))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, shift_mean: bool = True) -> torch.Tensor:
    """Reference of :func:`prefcore.ops.masked_whiten` (TRL's/verl's formula, plus zeros
    outside the mask): ``(x − μ)/sqrt(σ² + 1e-8)`` (``+ μ`` when ``shift_mean=False``) over the
    valid elements; ``unbiased`` σ² divides by ``n − 1``."""
    m = mask.bool()
    n = m.sum()
    need = 2 if unbiased else 1
    if int(n) < need:
        raise ValueError(f"masked_whiten needs at least {need} valid token{'s' if need > 1 else ''} (mask has {int(n)})")
    xm = torch.where(m, x, torch.zeros_like(x))
    mean = xm.sum() / n
    dev = torch.where(m, x - mean, torch.zeros_like(x))
    var = (dev * dev).sum() / (n - 1 if unbiased else n)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Per-row advantage from per-row returns ``R (B,)`` in contiguous groups of ``group_size``:
    rloo ``R_i − (Σ_g R − R_i)/(k − 1)``; grpo ``(R_i − mean_g)/(std_g + 1e-6)`` (unbiased std)."""
    k = group_size
    g = rewards.reshape(-1, k)
    if mode == "rloo":
        a = g - (g.sum(-1, keepdim=True) - g) / (k - 1)
    else:
        a = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True, unbiased=True) + GRPO_EPS)
    return a.reshape(-1)


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE by the reverse Python loop over T that TRL/verl/OpenRLHF use, with DESIGN §3.4's
    masks: a masked token leaves (g, next value) unchanged and gets advantage 0."""
    m = mask.bool()
    b, t_len = rewards.shape
    g = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    nv = torch.zeros_like(g)
    zero = torch.zeros_like(g)
    out = []
    for t in reversed(range(t_len)):
        mt = m[:, t]
        v = torch.where(mt, values[:, t], zero)
        delta = rewards[:, t] + gamma * nv - v
        g_new = delta + gamma * lam * g
        g = torch.where(mt, g_new, g)
        nv = torch.where(mt, v, nv)
        out.append(torch.where(mt, g_new, zero))
    if not out:
        return rewards.new_zeros(b, 0)
    return torch.stack(out[::-1], dim=1)


def gae_vectorized(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """The same GAE as :func:`gae_loop` with vectorised torch ops over chunks of the sequence.

    With c = γλ, rank k_t = number of valid tokens up to t and nv_t the value of the next valid
    token after t, ``A_t = Σ_{s ≥ t valid} c^{k_s − k_t} δ_s`` (δ_s = r_s + γ·nv_s − V_s).
    Inside a chunk that is a reverse cumulative sum of ``c^{e_s} δ_s`` scaled by ``c^{−e_t}``
    (exponents relative to the chunk, so they stay in range), plus the carry from the chunk to
    its right. c = 1 needs one chunk; smaller c uses chunks short enough that c^{chunk} does not
    underflow, so the Python loop runs over T/chunk steps instead of T.
    """
    m = mask.bool()
    b, t_len = rewards.shape
    dt = rewards.dtype
    if t_len == 0:
        return rewards.new_zeros(b, 0)
    zero = torch.zeros_like(rewards)
    v = torch.where(m, values, zero)
    # next valid index strictly after t (t_len = none): suffix minimum of valid indices
    idx = torch.arange(t_len, device=m.device).expand(b, t_len)
    valid_idx = torch.where(m, idx, t_len)
    suffix_min = valid_idx.flip(-1).cummin(-1).values.flip(-1)
    nxt = torch.cat([suffix_min[:, 1:], torch.full((b, 1), t_len, device=m.device)], dim=1)
    v_pad = torch.cat([v, torch.zeros(b, 1, dtype=dt, device=v.device)], dim=1)
    nv = v_pad.gather(1, nxt)
    delta = torch.where(m, rewards + gamma * nv - v, zero)
    c = gamma * lam
    if c == 0.0:
        return delta
    if c == 1.0:
        return torch.where(m, delta.flip(-1).cumsum(-1).flip(-1), zero)
    tiny = torch.finfo(dt).tiny
    chunk = max(1, min(t_len, 256, int(math.log(tiny) / math.log(c) / 2)))
    rank = m.long().cumsum(-1)  # k_t (inclusive), exact integers
    adv = torch.empty_like(rewards)
    carry = torch.zeros(b, 1, dtype=dt, device=rewards.device)  # A of the first valid token right of the chunk
    for end in range(t_len, 0, -chunk):
        start = max(0, end - chunk)
        base = rank[:, start - 1 : start] if start > 0 else torch.zeros(b, 1, dtype=torch.long, device=rewards.device)
        e = (rank[:, start:end] - base).to(dt)  # 1..chunk (≤ 256, exact in every dtype) on valid tokens
        n_valid = (rank[:, end - 1 : end] - base).to(dt)
        w = torch.pow(torch.tensor(c, dtype=dt, device=rewards.device), e)
        s = (w * delta[:, start:end]).flip(-1).cumsum(-1).flip(-1)
        a = (s + torch.pow(torch.tensor(c, dtype=dt, device=rewards.device), n_valid + 1) * carry) / w
        adv[:, start:end] = torch.where(m[:, start:end], a, zero[:, start:end])
        first = torch.where(m[:, start:end], idx[:, start:end] - start, chunk).amin(-1, keepdim=True)
        has = n_valid > 0
        carry = torch.where(has, a.gather(1, first.clamp_max(end - start - 1)), carry)
    return adv


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
    gae_impl: str = "loop",
) -> Advantages:
    """Reference of :func:`prefcore.ops.kl_penalized_advantages`, computed in the dtype of
    ``logprobs`` (the op returns float32). ``gae_impl`` picks :func:`gae_loop` (the reverse
    Python loop) or :func:`gae_vectorized`. Same semantics: see the op's docstring."""
    m = mask.bool()
    dt = logprobs.dtype
    kl = kl_penalty(logprobs, ref_logprobs.to(dt), m, estimator, kl_clamp)
    r = token_rewards(kl, m, scores.to(dt), kl_coef)
    zero = torch.zeros_like(r)
    if mode in ("rloo", "grpo"):
        row_a = group_advantages(r.sum(-1), int(group_size), mode)
        returns = torch.where(m, row_a[:, None].expand_as(r), zero)
        adv = masked_whiten(returns, m) if whiten else returns
    elif mode == "gae":
        vals = values.to(dt)
        gae = gae_loop if gae_impl == "loop" else gae_vectorized
        a = gae(r, vals, m, gamma, lam)
        returns = torch.where(m, a + vals, zero)
        adv = masked_whiten(a, m) if whiten else a
    else:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    return Advantages(adv, returns, r, kl)


# ---- token log-probs (DESIGN §3.5) --------------------------------------------------------


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`prefcore.ops.token_logprobs`: materialises the ``(*, V)`` logits in
    the input dtype (``log_softmax(h @ Wᵀ / T).gather``); outputs float32 (float64 for float64)."""
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax((hidden @ weight.T) / temperature, dim=-1)
    t = targets.long()
    if mask is not None:
        t = torch.where(mask, t, torch.zeros_like(t))  # masked ids are ignored, even out of range
    lp = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1).to(out_dtype)
    if mask is not None:
        lp = torch.where(mask, lp, torch.zeros_like(lp))
    if not return_entropy:
        return lp
    ent = -(logp.exp() * logp).sum(-1).to(out_dtype)
    if mask is not None:
        ent = torch.where(mask, ent, torch.zeros_like(ent))
    return lp, ent
