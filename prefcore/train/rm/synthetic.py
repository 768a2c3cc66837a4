"""The embedded default of ``prefcore train-rm``: the simulated ratings world of
:mod:`prefcore.data.synthetic` (annotator types scoring response features on [−1, 1], with a
contentious region a minority strongly dislikes), in feature space.

- ratings: features = ``[prompt features, response features]``; for ``qrm`` the scores are the
  per-attribute ratings ``(B, M, N)`` (helpfulness, safety), otherwise the overall rating ``(B, 1, N)``;
  the true (pre-clipping) mixture of the overall rating is attached for the report.
- pairs: fresh response pairs judged by ``num_votes`` voters plus one labeller whose pick is
  ``chosen``; votes are re-coded to 1 = preferred ``chosen``.
"""
from __future__ import annotations

import torch

from prefcore.data.synthetic import RatingsWorld, RatingsWorldConfig, make_ratings_world, sample_vote_pairs
from prefcore.losses import vote_margin
from prefcore.train.rm.data import PairsData, RatingsData, RMData

NUM_VOTES = 10


def ratings_from_world(world: RatingsWorld, *, attributes: bool) -> RatingsData:
    if attributes:
        scores = world.attribute_scores
        mask = world.mask[:, None, :].expand_as(scores).contiguous()
        names = tuple(world.attribute_names)
    else:
        scores, mask, names = world.scores[:, None, :], world.mask[:, None, :], ("overall",)
    logits, mu, log_sigma = (t.float() for t in world.true_score_mixture().gmm_params())
    return RatingsData(world.features, scores, mask, names, prompt_features=world.prompt_features,
                       truth_logits=logits, truth_mu=mu, truth_log_sigma=log_sigma)


def pairs_from_world(world: RatingsWorld, num_pairs: int, generator: torch.Generator) -> PairsData:
    vp = sample_vote_pairs(world, num_pairs, NUM_VOTES, generator)
    a = torch.cat([vp.prompt_features, vp.response_a], -1)
    b = torch.cat([vp.prompt_features, vp.response_b], -1)
    pick_a = vp.label[:, None]
    chosen, rejected = torch.where(pick_a, a, b), torch.where(pick_a, b, a)
    votes = torch.where(pick_a, vp.votes, 1 - vp.votes)
    return PairsData(chosen, rejected, vp.prompt_features, votes, torch.ones_like(votes, dtype=torch.bool),
                     vote_margin(votes))


def synthetic_rm_data(cfg) -> RMData:
    """The synthetic training data for ``cfg.method`` (deterministic in ``cfg.seed``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    world = make_ratings_world(g, RatingsWorldConfig(num_items=cfg.num_items))
    if cfg.method in ("bt", "bt-margin"):
        return RMData(pairs=pairs_from_world(world, cfg.num_pairs, g))
    ratings = ratings_from_world(world, attributes=cfg.method == "qrm")
    pairs = pairs_from_world(world, cfg.num_pairs, g) if cfg.method == "qrm" else None
    return RMData(ratings=ratings, pairs=pairs)
