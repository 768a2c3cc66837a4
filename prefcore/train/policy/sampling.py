"""Sampling completions with a KV cache, with randomness keyed per completion.

Each completion's sampling noise is drawn from its own generator seeded by
``(seed, step, global completion index)``, and a token is picked by inverting the filtered CDF at
that noise. So what a completion samples does not depend on the batch it is generated in, the rank
it runs on or the RNG history: a resumed run and a DDP run sample exactly what the uninterrupted
single-process run samples (up to floating-point differences in the logits).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from prefcore.train.policy.logprobs import positions, trunk_and_head


def stream_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and integer keys (fixed arithmetic, no Python hash)."""
    s = seed + 0x9E3779B97F4A7C15
    for k in keys:
        s = ((s ^ (k + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) % (1 << 64)
        s ^= s >> 31
    return s % (1 << 63)


def completion_noise(seed: int, step: int, ids: list[int], length: int) -> torch.Tensor:
    """Uniform noise ``(len(ids), length)`` float64, row ``r`` from the stream of completion ``ids[r]``."""
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(stream_seed(seed, step, i)),
                       dtype=torch.float64) for i in ids]
    return torch.stack(rows) if rows else torch.zeros(0, length, dtype=torch.float64)


def filter_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``z (B, V)`` with everything outside the top-k / nucleus (top-p) set to −inf (HF semantics:
    the nucleus keeps the smallest set of most likely tokens whose mass reaches ``top_p``)."""
    v = z.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
        drop = (cum - torch.softmax(sorted_z, dim=-1)) >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False
        z = z.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return z


@dataclass
class Completions:
    ids: torch.Tensor        # (B, Tc) int64, pad after the first EOS
    mask: torch.Tensor       # (B, Tc) bool: tokens up to and including the first EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens


def completion_mask(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, truncated)`` of completions ``ids (B, T)``: valid up to and including the first EOS;
    a row without EOS is valid throughout and flagged truncated."""
    is_eos = ids == eos_id
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~seen_before, ~is_eos.any(-1)


def _cache_kwarg(trunk) -> str:
    """transformers ≥ 5.2x names the KV-cache argument ``cache``; earlier ones ``past_key_values``."""
    params = inspect.signature(trunk.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, noise: torch.Tensor, *,
                       eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> Completions:
    """Sample up to ``noise.shape[1]`` tokens per row after left-padded prompts ``(B, Lp)``, with the
    trunk's KV cache; stops early once every row has emitted EOS. Only the last position's logits
    ``(B, V)`` are built per step."""
    trunk, head = trunk_and_head(model)
    w = head.weight
    b, steps = noise.shape
    attn = prompt_mask.long()
    pos = positions(attn)
    out = trunk(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache_kw = _cache_kwarg(trunk)
    cache, h = _cache_of(out), out.last_hidden_state[:, -1]
    next_pos = pos[:, -1] + 1
    done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for t in range(steps):
        z = filter_logits((h.float() @ w.float().t()) / temperature, top_k, top_p)
        cdf = torch.softmax(z, dim=-1).double().cumsum(-1)
        u = noise[:, t:t + 1].to(cdf.device) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=w.shape[0] - 1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= tok == eos_id
        if bool(done.all()) or t + 1 == steps:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = trunk(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: cache})
        cache, h = _cache_of(out), out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    ids = torch.stack(tokens, dim=1)
    mask, truncated = completion_mask(ids, eos_id)
    ids = torch.where(mask, ids, torch.full_like(ids, pad_id))
    return Completions(ids, mask, truncated)
