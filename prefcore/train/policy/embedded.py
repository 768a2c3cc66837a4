"""The embedded default of ``prefcore train-policy``: the text world (:mod:`prefcore.data.text_world`).

With no ``--model_name_or_path`` the policy is the world's tiny causal LM, built in code and
pretrained for ``PRETRAIN_STEPS`` steps on the synthetic language (~30 s on 2 CPU cores); with no
``--dataset`` the prompts are the world's 48 default prompts; with no ``--reward_model`` the reward
is the simulated population itself — for each completion the *exact* distribution of one
population rating (:meth:`TextWorld.rating_distribution`, a Gaussian mixture over the annotator
types), which ``--utility`` turns into a scalar (mean, CE, mean − α·Var, CVaR, a quantile).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

PRETRAIN_STEPS = 300


def population_reward(world) -> Callable[..., Any]:
    """``f(prompts, completions, **kw)`` → the population's rating distribution of each completion
    (a batch-``(B,)`` :class:`~prefcore.distributions.GaussianMixture`), TRL's calling convention."""

    def text_world_population(prompts, completions, **kwargs):
        return world.rating_distribution(prompts, completions)

    return text_world_population


def default_world_setup(*, seed: int = 0, model: bool = True, prompts: bool = True, reward: bool = True,
                        progress: bool = True) -> dict[str, Any]:
    """``{"model", "tokenizer", "prompts", "reward"}`` from the text world — only the parts asked
    for (the policy is pretrained only when ``model`` is requested); deterministic for ``seed``."""
    from prefcore.data.text_world import TextWorld

    world = TextWorld()
    out: dict[str, Any] = {}
    if model:  # the world's tokenizer goes with the world's policy only
        out["tokenizer"] = world.tokenizer
        policy = world.make_policy(seed=seed)
        world.pretrain(policy, steps=PRETRAIN_STEPS, seed=seed, progress=progress)
        out["model"] = policy
    if prompts:
        out["prompts"] = world.default_prompts()
    if reward:
        out["reward"] = population_reward(world)
    return out
