"""The papers' claim on the embedded default, with exact ground truth: RLOO against the population's
rating distribution with a risk-averse utility (QRM's CE with large λ, DFL's mean − α·Var, CVaR)
lowers the true catastrophic-response rate (CRR: some annotator type's expected rating < −0.7)
compared with the ``mean`` utility, over several seeds; and the utility rises during training.

Setup: 150 pretraining steps, 30 RLOO steps of 8 prompts × 4 completions, lr 2e-3, β = 0.05; CRR
over 128 held-out samples. The fixture prints the measured (true mean rating, CRR) of every run
(``pytest -s``); the assertions are the claims, not those values.
"""
from __future__ import annotations

import copy

import pytest

from prefcore.data.text_world import TextWorld
from prefcore.train.policy import PolicyConfig, train_policy
from prefcore.train.policy.embedded import population_reward

pytestmark = pytest.mark.slow

UTILITIES = ("mean", "ce:4", "mean-var:1", "cvar:0.25")
SEEDS = (0, 1)
STEPS = 30

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    world = TextWorld()
    base = world.make_policy(seed=0)
    world.pretrain(base, steps=150, seed=0)
    prompts = [p for p in world.prompts(64, seed=99) for _ in range(2)]

    def evaluate(model) -> tuple[float, float]:
        texts = world.generate(model, prompts, seed=5)
        return float(world.mean_rating(prompts, texts).mean()), world.crr(prompts, texts)

    results = {"start": evaluate(base)}
    for seed in SEEDS:
        for utility in UTILITIES:
            model = copy.deepcopy(base)
            cfg = PolicyConfig(algo="rloo", utility=utility, max_steps=STEPS, per_device_train_batch_size=8,
                               num_generations=4, learning_rate=2e-3, kl_coef=0.05, seed=seed,
                               max_completion_length=24, save_steps=10_000, no_progress=True, device="cpu",
                               output_dir=str(tmp_path_factory.mktemp(f"risk-{seed}-{utility.replace(':', '')}")))
            summary = train_policy(cfg, model=model, tokenizer=world.tokenizer, prompts=world.default_prompts(),
                                   reward=population_reward(world))
            results[(seed, utility)] = (*evaluate(model), summary["output_dir"])
    print("\n(true mean rating, CRR): start", tuple(round(v, 3) for v in results["start"]))
    for key, val in results.items():
        if key != "start":
            print(key, round(val[0], 3), round(val[1], 3))
    return results


def _utilities(run_dir: str) -> list[float]:
    import json
    import os

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["utility"] for line in f if line.strip()]


@pytest.mark.parametrize("utility", UTILITIES)
def test_utility_rises(runs, utility):
    for seed in SEEDS:
        u = _utilities(runs[(seed, utility)][2])
        third = max(1, len(u) // 3)
        first, last = sum(u[:third]) / third, sum(u[-third:]) / third
        assert last > first, (seed, utility, first, last)


@pytest.mark.parametrize("utility", ["ce:4", "mean-var:1", "cvar:0.25"])
def test_risk_averse_utility_lowers_true_crr(runs, utility):
    crr = {seed: (runs[(seed, "mean")][1], runs[(seed, utility)][1]) for seed in SEEDS}
    mean_crr = sum(c[0] for c in crr.values()) / len(SEEDS)
    risk_crr = sum(c[1] for c in crr.values()) / len(SEEDS)
    assert risk_crr < mean_crr, crr
    assert all(r < m for m, r in crr.values()), crr  # and on every seed


def test_mean_utility_raises_true_mean_rating(runs):
    start_mean = runs["start"][0]
    for seed in SEEDS:
        assert runs[(seed, "mean")][0] > start_mean, (seed, runs[(seed, "mean")], start_mean)
