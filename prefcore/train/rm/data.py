"""Feature-space training data of reward models: rated items and preference pairs.

Text data sets are turned into these by extracting frozen-backbone features once
(:func:`prefcore.train.rm.features.extract_features`); the synthetic population provides them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def _index(value, idx: torch.Tensor):
    return value[idx] if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class RatingsData:
    """Rated items. ``features (N, D)``; ``scores (N, M, S)`` — S annotator scores for each of M
    attributes (M = 1 for plain ratings); ``mask (N, M, S)`` bool, True where a score exists;
    ``prompt_features (N, Dp)`` or None. ``truth_*`` (optional, synthetic data only): the true
    score distribution of each item as a Gaussian mixture ``(N, K)`` per parameter, for attribute 0."""

    features: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor
    attribute_names: tuple[str, ...] = ("score",)
    prompt_features: torch.Tensor | None = None
    truth_logits: torch.Tensor | None = None
    truth_mu: torch.Tensor | None = None
    truth_log_sigma: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.dim() != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(self.features.shape)}")
        if self.scores.dim() != 3 or self.scores.shape[0] != n:
            raise ValueError(f"scores must have shape (N, M, S) with N = {n}, got {tuple(self.scores.shape)}")
        if self.mask.shape != self.scores.shape or self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(self.scores.shape)}, "
                             f"got {self.mask.dtype} {tuple(self.mask.shape)}")
        if len(self.attribute_names) != self.scores.shape[1]:
            raise ValueError(f"attribute_names must name the M = {self.scores.shape[1]} attributes, "
                             f"got {self.attribute_names}")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_attributes(self) -> int:
        return self.scores.shape[1]

    def subset(self, idx: torch.Tensor) -> RatingsData:
        return RatingsData(**{f.name: _index(getattr(self, f.name), idx) for f in fields(self)})


@dataclass(frozen=True)
class PairsData:
    """Preference pairs. ``chosen, rejected (P, D)`` response features; ``prompt (P, Dp)`` or None;
    ``votes (P, n)`` 0/1 (1 = a judge preferred ``chosen``) with ``vote_mask (P, n)`` bool, or None;
    ``margin (P,)`` the disagreement margin of each pair (bt-margin), or None."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    prompt: torch.Tensor | None = None
    votes: torch.Tensor | None = None
    vote_mask: torch.Tensor | None = None
    margin: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.chosen.dim() != 2 or self.chosen.shape != self.rejected.shape:
            raise ValueError(f"chosen and rejected must both have shape (P, D), got {tuple(self.chosen.shape)} "
                             f"and {tuple(self.rejected.shape)}")
        p = self.chosen.shape[0]
        for name in ("prompt", "votes", "vote_mask"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 2 or t.shape[0] != p):
                raise ValueError(f"{name} must have shape (P, ·) with P = {p}, got {tuple(t.shape)}")
        if self.margin is not None and tuple(self.margin.shape) != (p,):
            raise ValueError(f"margin must have shape (P,) = ({p},), got {tuple(self.margin.shape)}")
        if self.vote_mask is not None and (self.votes is None or self.vote_mask.shape != self.votes.shape):
            raise ValueError("vote_mask needs votes of the same shape")

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def subset(self, idx: torch.Tensor) -> PairsData:
        return PairsData(**{f.name: _index(getattr(self, f.name), idx) for f in fields(self)})

    def vote_fraction(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(fraction (P,), has_votes (P,) bool)``: the fraction of valid votes for ``chosen``
        (0 where a pair has no vote), or None without votes."""
        if self.votes is None:
            return None
        m = self.vote_mask if self.vote_mask is not None else torch.ones_like(self.votes, dtype=torch.bool)
        n = m.sum(-1)
        return (self.votes.float() * m).sum(-1) / n.clamp_min(1), n > 0


def held_out_count(n: int, eval_fraction: float, what: str, source: str | None = None) -> int:
    """Rows held out of ``n`` at ``eval_fraction`` (``round(eval_fraction·n)``); ``ValueError`` when
    that leaves no held-out or no training row. ``source`` (a file) is named in the message."""
    n_eval = int(round(eval_fraction * n))
    if n_eval < 1 or n - n_eval < 1:
        where = f"data {source!r}: " if source else ""
        hint = "add rows to the file" if source else "use more data (--num_items / --num_pairs)"
        raise ValueError(f"{where}{n} {what} rows leave no {'held-out' if n_eval < 1 else 'training'} rows at "
                         f"eval_fraction = {eval_fraction}: {hint} or another eval_fraction")
    return n_eval


@dataclass(frozen=True)
class RMData:
    """What a run trains on: rated items, preference pairs, or both (QRM)."""

    ratings: RatingsData | None = None
    pairs: PairsData | None = None

    def split(self, eval_fraction: float, seed: int) -> tuple[RMData, RMData]:
        """A deterministic train / held-out split of each part (held-out = the first
        ``ceil(eval_fraction·n)`` rows of a seeded permutation)."""
        def cut(part):
            if part is None:
                return None, None
            n = len(part)
            n_eval = held_out_count(n, eval_fraction, type(part).__name__[:-4].lower())
            g = torch.Generator().manual_seed(seed + 7919)
            perm = torch.randperm(n, generator=g)
            return part.subset(perm[n_eval:]), part.subset(perm[:n_eval])
        r_train, r_eval = cut(self.ratings)
        p_train, p_eval = cut(self.pairs)
        return RMData(r_train, p_train), RMData(r_eval, p_eval)
