"""The self-contained reward-model directory: a frozen text run stores its backbone and tokenizer
(``RUN/backbone``) and its training rewards' mean/std (``RUN/reward_stats.json``), and every
consumer — ``RunScorer.load``, train-policy's reward loading, the TRL reward function — scores
identically after the run is moved and the original backbone is deleted."""
from __future__ import annotations

import json
import shutil

import torch

from python_tests.rm_runs import shared_runs, text_world, train_text_run


def _score_all(run: str, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
    from prefcore.integrations.trl import reward_function
    from prefcore.train.policy.rewards import make_reward
    from prefcore.train.rm.scoring import RunScorer
    from prefcore.utility import parse_utility

    scorer = RunScorer.load(run)
    policy = make_reward(run, parse_utility("cvar:0.2"), "cvar:0.2")(prompts, responses)
    trl = reward_function(run, "ce:1", batch_size=3)
    return {"scorer_quantiles": scorer.reward_distribution(prompts, responses).values,
            "policy_utility": policy.utility, "policy_mean": policy.reward,
            "trl": torch.tensor(trl(prompts, responses))}


def test_a_moved_run_scores_identically_without_its_original_backbone(tmp_path):
    world = text_world(tmp_path / "world")
    run = train_text_run(world, tmp_path / "run", "qrm")
    assert (run / "backbone" / "config.json").is_file() and (run / "backbone" / "model.safetensors").is_file()
    assert (run / "backbone" / "tokenizer.json").is_file()
    prompts = [r["prompt"] for r in world.records[:7]]
    responses = [r["response"] for r in world.records[:7]]
    before = _score_all(str(run), prompts, responses)

    moved = tmp_path / "shipped" / "rm"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    shutil.rmtree(world.backbone)  # the recorded --backbone path is gone
    assert json.loads((moved / "config.json").read_text())["backbone"] == str(world.backbone)
    after = _score_all(str(moved), prompts, responses)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert before["scorer_quantiles"].shape == (7, 19)


def test_reward_stats_are_the_training_rewards_mean_and_std(tmp_path):
    from prefcore.train.rm.scoring import RunScorer
    from prefcore.train.rm.sources import load_rm_data
    from prefcore.train.rm.trainer import TrainRMConfig

    world, _, run = shared_runs()
    stats = json.loads((run / "reward_stats.json").read_text())
    # The training split's features, read back from the run's own cache (RUN/features), scored by
    # the stored heads.
    cfg = TrainRMConfig(method="bt", data=str(world.pairs), backbone=str(world.backbone), max_length=48,
                        out=str(run), progress=False)
    train, _ = load_rm_data(cfg).split(cfg.eval_fraction, cfg.seed)
    scorer = RunScorer.load(str(run))
    r = torch.cat([scorer.distribution_from_features(train.pairs.chosen),
                   scorer.distribution_from_features(train.pairs.rejected)]).double()
    assert stats["count"] == 2 * len(train.pairs) == r.numel()
    assert abs(stats["mean"] - r.mean().item()) < 1e-6
    assert abs(stats["std"] - ((r - r.mean()) ** 2).mean().sqrt().item()) < 1e-6
    assert stats["std"] > 0
