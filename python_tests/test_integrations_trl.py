"""prefcore.integrations.trl: a `prefcore train-rm` run (trained here on the text world's DFL-style
feedback) as a TRL reward function — its values against independent maths, its errors, the
conversational format, and TRL's own RLOOTrainer running 2 steps with it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize
from scipy.special import logsumexp
from scipy.stats import norm

from prefcore.data import save_jsonl
from prefcore.data.text_world import TextWorld
from prefcore.integrations.trl import RewardFunction, message_text, reward_function
from prefcore.train.rm import RunScorer, TrainRMConfig, train_reward_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained text-world policy (its trunk is the RM backbone) and tiny gmm, qrm and bt runs
    on ratings / votes of the world's answers."""
    d = tmp_path_factory.mktemp("trl")
    world = TextWorld()
    policy = world.make_policy(seed=0)
    world.pretrain(policy, steps=20, seed=0, batch_size=16, corpus_size=256)
    world.save(d / "policy", model=policy)
    prompts = world.prompts(96, seed=1)
    a, b = world.sample_completions(prompts, seed=2), world.sample_completions(prompts, seed=3)
    g = torch.Generator().manual_seed(0)
    ratings, _ = world.rating_records(prompts, a, g)
    pairs, _ = world.pair_records(prompts, a, b, g)
    save_jsonl(ratings, d / "ratings.jsonl")
    save_jsonl(pairs, d / "pairs.jsonl")
    common = dict(backbone=str(d / "policy"), batch_size=32, max_length=48, progress=False, log_every=5,
                  checkpoint_every=100, warmup_steps=2)
    for method, data, extra in (("gmm", "ratings", {}), ("qrm", "ratings", {"pairs": str(d / "pairs.jsonl"), "gate_steps": 5}),
                                ("bt", "pairs", {})):
        train_reward_model(TrainRMConfig(method=method, data=str(d / f"{data}.jsonl"), steps=10, out=str(d / f"rm-{method}"),
                                         **common, **extra))
    return d, world, prompts, a


def _gmm_params(run_dir, prompts, completions):
    dist = RunScorer.load(str(run_dir)).reward_distribution(prompts, completions)
    return dist.logits.softmax(-1).double().numpy(), dist.mu.double().numpy(), dist.log_sigma.exp().double().numpy()


def test_gmm_run_utilities_match_independent_maths(runs):
    d, _, prompts, comps = runs
    p, c = prompts[:4], comps[:4]
    w, mu, sd = _gmm_params(d / "rm-gmm", p, c)
    got = {spec: reward_function(d / "rm-gmm", utility=spec)(p, c)
           for spec in ("mean", "ce:2", "mean-var:0.5", "cvar:0.25", "quantile:0.1")}
    for b in range(4):
        cdf = lambda x: float((w[b] * norm.cdf(x, mu[b], sd[b])).sum())  # noqa: E731
        pdf = lambda x: float((w[b] * norm.pdf(x, mu[b], sd[b])).sum())  # noqa: E731
        mean = float((w[b] * mu[b]).sum())
        var = float((w[b] * (sd[b] ** 2 + mu[b] ** 2)).sum()) - mean ** 2
        q25 = optimize.brentq(lambda x: cdf(x) - 0.25, -20, 20, xtol=1e-12)
        want = {
            "mean": mean,
            "ce:2": -math.log(float((w[b] * np.exp(-2 * mu[b] + 2 * sd[b] ** 2)).sum())) / 2,
            "mean-var:0.5": mean - 0.5 * var,
            "cvar:0.25": integrate.quad(lambda x: x * pdf(x), -np.inf, q25, limit=200)[0] / 0.25,
            "quantile:0.1": optimize.brentq(lambda x: cdf(x) - 0.1, -20, 20, xtol=1e-12),
        }
        for spec, v in want.items():
            assert got[spec][b] == pytest.approx(v, abs=2e-5), (spec, b)
    assert all(isinstance(x, float) for x in got["mean"])


def test_qrm_run_ce_is_exp_utility_over_gated_quantiles(runs):
    d, _, prompts, comps = runs
    f = reward_function(d / "rm-qrm", utility="ce:3")
    assert f.__name__ == "prefcore_qrm_ce:3"
    dist = f.distribution(prompts[:5], comps[:5])
    q = dist.values.double().numpy()  # the gated mixture Σ_m g_m·Q_m, (B, Q)
    want = -(logsumexp(-3 * q, axis=-1) - math.log(q.shape[-1])) / 3
    assert f(prompts[:5], comps[:5]) == pytest.approx(want.tolist(), abs=1e-5)
    # risk aversion: CE at λ=3 never exceeds the mean of the same quantile set
    assert all(x <= y + 1e-6 for x, y in zip(f(prompts[:5], comps[:5]), q.mean(-1)))


def test_callable_contract_and_conversational_format(runs):
    d, _, prompts, comps = runs
    f = reward_function(d / "rm-gmm", utility="cvar:0.25", batch_size=3)
    plain = f(prompts[:7], comps[:7], completion_ids=[[1]] * 7, trainer_state=None, extra_column=list(range(7)))
    assert isinstance(plain, list) and len(plain) == 7
    # batches of 3 vs one batch of 7: the same values up to fp32 rounding of the padded backbone passes
    assert plain == pytest.approx(reward_function(d / "rm-gmm", utility="cvar:0.25")(prompts[:7], comps[:7]), rel=1e-5, abs=1e-5)
    conv = f([[{"role": "user", "content": p}] for p in prompts[:7]],
             [[{"role": "assistant", "content": c}] for c in comps[:7]])
    assert conv == pytest.approx(plain, rel=1e-5, abs=1e-5)
    assert message_text([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]) == "a\n\nb"
    assert isinstance(f, RewardFunction) and f.__name__ == "prefcore_gmm_cvar:0.25"
    assert reward_function(d / "rm-gmm", name="risk").__name__ == "risk"
    with pytest.raises(ValueError, match="same length"):
        f(prompts[:2], comps[:3])
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        f(prompts[:1], [42])


def test_errors(runs, tmp_path, monkeypatch):
    d, _, prompts, comps = runs
    with pytest.raises(ValueError, match="utility: unknown utility 'cvr'"):
        reward_function(tmp_path / "nowhere", utility="cvr:0.1")  # the utility is checked before the run is read
    with pytest.raises(ValueError, match=r"utility: α of cvar must lie in \(0, 1\]"):
        reward_function(d / "rm-gmm", utility="cvar:2")
    with pytest.raises(FileNotFoundError, match="run_dir"):
        reward_function(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="bt run"):
        reward_function(d / "rm-bt", utility="ce:1")
    assert len(reward_function(d / "rm-bt")(prompts[:3], comps[:3])) == 3
    with pytest.raises(ValueError, match="batch_size"):
        reward_function(d / "rm-gmm", batch_size=0)
    # a run on the synthetic feature default has no backbone to embed text with
    train_reward_model(TrainRMConfig(method="gmm", steps=2, num_items=40, num_pairs=40, out=str(tmp_path / "feat"),
                                     progress=False, batch_size=16, warmup_steps=0))
    with pytest.raises(ValueError, match="trained on features"):
        reward_function(tmp_path / "feat")
    # a non-finite utility is an error naming the prompt, never a NaN reward handed to the trainer
    f = reward_function(d / "rm-gmm", utility="mean")
    from prefcore.distributions import GaussianMixture

    def nan_dist(p, c):
        mu = torch.zeros(len(p), 2)
        mu[1, 0] = float("nan")
        return GaussianMixture(torch.zeros(len(p), 2), mu, torch.zeros(len(p), 2))

    monkeypatch.setattr(f.scorer, "reward_distribution", nan_dist)
    with pytest.raises(ValueError, match=r"non-finite utility .* prompts\[1\]"):
        f(prompts[:3], comps[:3])


def test_trl_rloo_trainer_runs_two_steps_with_it(runs, tmp_path):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    d, world, _, _ = runs
    f = reward_function(d / "rm-gmm", utility="cvar:0.25")
    calls: list[tuple[list, list, list[float], set]] = []

    def recorded(prompts, completions, **kwargs):
        out = f(prompts, completions, **kwargs)
        calls.append((list(prompts), list(completions), out, set(kwargs)))
        return out

    recorded.__name__ = f.__name__
    args = RLOOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                      save_strategy="no", learning_rate=1e-3, bf16=False, seed=0, disable_tqdm=True)
    trainer = RLOOTrainer(model=str(d / "policy"), reward_funcs=recorded, args=args,
                          train_dataset=Dataset.from_dict({"prompt": world.prompts(8, seed=0)}),
                          processing_class=world.tokenizer)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert len(calls) == 2  # one scoring call per step, 4 completions each, with TRL's keyword arguments
    assert all(len(c) == 4 and len(r) == 4 for _, c, r, _ in calls)
    assert {"completion_ids", "trainer_state"} <= calls[0][3]
    logs = [h for h in trainer.state.log_history if f"rewards/{f.__name__}/mean" in h]
    assert len(logs) == 2
    for h, (prompts, comps, out, _) in zip(logs, calls):
        assert h[f"rewards/{f.__name__}/mean"] == pytest.approx(float(np.mean(out)), abs=1e-5)
        # what TRL got is the utility of the reward model's distribution for those texts
        dist = f.distribution(prompts, comps)
        assert out == pytest.approx([float(x) for x in f.utility(dist)], abs=1e-6)
        assert all(p in set(world.prompts(8, seed=0)) for p in prompts)
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert changed  # the rewards differed within groups, so RLOO's advantages moved the policy

