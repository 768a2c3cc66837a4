"""Policy training (RLOO / GRPO / PPO): log-probs from hidden states, masking, advantages against
TRL's formulas, loss aggregation, rewards, and short end-to-end runs on a tiny random Llama."""
from __future__ import annotations

import math

import pytest
import torch

from prefcore.train.policy import PolicyConfig, PolicyTrainer, train_policy
from prefcore.train.policy import trainer as trainer_mod
from prefcore.train.policy.logprobs import completion_logprobs, positions
from prefcore.train.policy.losses import AdaptiveKL, agg_denominator, agg_numerator, clipped_policy_loss
from prefcore.train.policy.sampling import completion_mask, filter_logits
from python_tests.test_train_policy_common import (
    EOS,
    PAD,
    PROMPTS,
    count_a,
    make_policy,
    make_tokenizer,
    quantile_reward,
    read_metrics,
)


def cfg_for(tmp_path, **kw) -> PolicyConfig:
    base = dict(num_generations=2, max_completion_length=6, per_device_train_batch_size=2, max_steps=2,
                learning_rate=1e-2, kl_coef=0.05, out=str(tmp_path / "run"), no_progress=True, save_steps=100)
    base.update(kw)
    return PolicyConfig(**base)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = True
    return ids, mask


def unpadded_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """Reference: one unpadded sequence, full logits, log_softmax (and entropy) in fp64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    lp = logp[pos, torch.tensor(completion)]
    ent = -(logp.exp() * logp).sum(-1)[pos]
    return lp, ent


# ---- log-probs -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_full_logits_with_left_padding(temperature):
    model = make_policy().eval()
    prompts = [[3, 4, 5, 6, 7], [8], [9, 10, 11]]
    completions = [[12, 13, EOS], [14, 15, 16, 17, 18], [EOS]]  # EOS mid, cut at the limit, EOS first
    pids, pmask = left_pad(prompts)
    cids = torch.full((3, 5), PAD, dtype=torch.long)
    cmask = torch.zeros(3, 5, dtype=torch.bool)
    for i, c in enumerate(completions):
        cids[i, :len(c)] = torch.tensor(c)
        cmask[i, :len(c)] = True
    with torch.no_grad():
        lp, ent, _ = completion_logprobs(model, pids, pmask, cids, cmask, temperature=temperature, return_entropy=True)
    assert lp.dtype == torch.float32 and lp.shape == (3, 5)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ref_lp, ref_ent = unpadded_logprobs(model, p, c, temperature)
        torch.testing.assert_close(lp[i, :len(c)].double(), ref_lp, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ent[i, :len(c)].double(), ref_ent, atol=2e-5, rtol=1e-5)
        assert (lp[i, len(c):] == 0).all() and (ent[i, len(c):] == 0).all()


# ---- sampling and masks ------------------------------------------------------------------------

def test_completion_mask_first_eos_and_truncation():
    ids = torch.tensor([[EOS, 5, EOS, 6], [5, 6, 7, 8], [5, 6, EOS, EOS]])
    mask, truncated = completion_mask(ids, EOS)
    assert mask.tolist() == [[True, False, False, False], [True] * 4, [True, True, True, False]]
    assert truncated.tolist() == [False, True, False]


def test_filter_logits_top_k_top_p():
    z = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    assert torch.isinf(filter_logits(z, 2, 1.0)).tolist() == [[False, False, False, True]]  # ties kept, as HF
    assert torch.isinf(filter_logits(z, 0, 0.6)).tolist() == [[False, False, True, True]] or \
        torch.isinf(filter_logits(z, 0, 0.6)).tolist() == [[False, True, False, True]]
    assert not torch.isinf(filter_logits(z, 0, 1.0)).any()


def crafted_noise(model, prompt: list[int], plan: list[str], length: int) -> torch.Tensor:
    """Noise that makes the sampler pick, at each step, EOS ('eos') or the most likely non-EOS token
    ('tok'), computed from a full (no KV cache), unpadded forward of the prefix."""
    noise = torch.full((length,), 0.5, dtype=torch.float64)
    prefix = list(prompt)
    for t, what in enumerate(plan):
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1].double(), -1)
        cdf = p.cumsum(-1)
        if what == "eos":
            j = EOS
        else:
            q = p.clone()
            q[EOS] = 0
            j = int(q.argmax())
        lo = 0.0 if j == 0 else float(cdf[j - 1])
        noise[t] = (lo + float(cdf[j])) / 2 / float(cdf[-1])
        prefix.append(j)
        if what == "eos":
            break
    return noise


def test_masking_cases_through_a_training_step(tmp_path, monkeypatch):
    """EOS first (empty completion), never EOS (cut at the limit), EOS mid; left-padded prompts of
    different lengths: masks, texts, log-probs and RLOO advantages on exactly the generated tokens."""
    L = 5
    model = make_policy()
    tok = make_tokenizer()
    prompts = ["a b c d e f", "g"]
    cfg = cfg_for(tmp_path, max_steps=1, max_completion_length=L, kl_coef=0.1)
    rewards = {}

    def reward(ps, cs, **kw):
        out = [0.3 * len(c.split()) + 0.1 * i for i, c in enumerate(cs)]
        rewards["scores"] = out
        return out

    trainer = PolicyTrainer(cfg, model=model, tokenizer=tok, prompts=prompts, reward=reward)
    order = trainer.step_prompts(0)
    plans = [["eos"], ["tok"] * L, ["tok", "tok", "eos"], ["tok", "eos"]]
    ptoks = [trainer.prompt_tokens[order[r // 2]] for r in range(4)]
    noise = torch.stack([crafted_noise(model.eval(), ptoks[r], plans[r], L) for r in range(4)])
    monkeypatch.setattr(trainer_mod, "completion_noise", lambda seed, step, ids, length: noise[ids])
    trainer.train_step()
    ro = trainer.last_rollout
    mask = ro["mask"]
    lengths = [1, L, 3, 2]
    assert mask.sum(-1).tolist() == lengths
    for r, n in enumerate(lengths):
        assert mask[r, :n].all() and not mask[r, n:].any()
    assert ro["truncated"].tolist() == [False, True, False, False]
    assert ro["completions"][0] == "" and len(ro["completions"][1].split()) == L
    assert ro["ids"][0, 0] == EOS and ro["ids"][2, 2] == EOS
    # old log-probs: exactly the generated tokens, equal to an unpadded full-logits forward
    for r, n in enumerate(lengths):
        ref_lp, _ = unpadded_logprobs(trainer.ref_model, ptoks[r], ro["ids"][r, :n].tolist())  # initial weights
        torch.testing.assert_close(ro["old_logprobs"][r, :n].double(), ref_lp, atol=2e-5, rtol=1e-5)
        assert (ro["old_logprobs"][r, n:] == 0).all()
    # RLOO with the KL in the reward (reference = initial policy: kl = 0 at step 0, still checked)
    kl = (ro["old_logprobs"] - ro["ref_logprobs"]) * mask
    R = torch.tensor(rewards["scores"], dtype=torch.float64) - 0.1 * kl.double().sum(-1)
    R = R.view(2, 2)
    expected = (R - (R.sum(-1, keepdim=True) - R) / 1).reshape(-1)
    adv = ro["advantages"]
    for r, n in enumerate(lengths):
        torch.testing.assert_close(adv[r, :n].double(), expected[r].expand(n), atol=1e-6, rtol=1e-6)
        assert (adv[r, n:] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reward_names_the_prompt(tmp_path, bad):
    def reward(ps, cs, **kw):
        return [bad if p == "d e" else 0.0 for p in ps]

    trainer = PolicyTrainer(cfg_for(tmp_path, per_device_train_batch_size=4), model=make_policy(),
                            tokenizer=make_tokenizer(), prompts=PROMPTS[:4], reward=reward)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"non-finite reward .*prompt 'd e'"):
        trainer.train_step()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update happened


# ---- advantages vs TRL's formulas --------------------------------------------------------------

def _trainer(tmp_path, **kw) -> PolicyTrainer:
    return PolicyTrainer(cfg_for(tmp_path, **kw), model=make_policy(), tokenizer=make_tokenizer(),
                         prompts=PROMPTS, reward=count_a)


def _rollout_like(b: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g) * 3
    ref = lp + 0.3 * torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    scores = torch.randn(b, generator=g)
    return lp * mask, ref * mask, mask, scores


def test_rloo_advantages_equal_trl_formula(tmp_path):
    k, beta = 4, 0.07
    tr = _trainer(tmp_path, algo="rloo", num_generations=k)
    lp, ref, mask, scores = _rollout_like(12, 6)
    adv = tr.compute_advantages(lp, ref, mask, scores, beta).advantages
    # TRL RLOOTrainer: rlhf_reward = score − β·Σ_t (lp − ref); baseline = (Σ_group − own)/(k − 1)
    rlhf = scores.double() - beta * ((lp - ref).double() * mask).sum(-1)
    grp = rlhf.view(-1, k)
    expected = (grp - (grp.sum(-1, keepdim=True) - grp) / (k - 1)).reshape(-1)
    torch.testing.assert_close(adv.double(), expected[:, None] * mask, atol=1e-6, rtol=1e-6)


def test_grpo_advantages_equal_trl_formula(tmp_path):
    k = 3
    tr = _trainer(tmp_path, algo="grpo", num_generations=k, kl_in_reward=False, per_device_train_batch_size=2)
    lp, ref, mask, scores = _rollout_like(9, 5, seed=1)
    adv = tr.compute_advantages(lp, ref, mask, scores, 0.3).advantages
    # TRL GRPOTrainer: (r − mean_g)/(std_g + eps) with the unbiased std; the KL is a loss term, not in r.
    # (TRL's eps is 1e-4; DESIGN §3.4 fixes 1e-6 for the op, used here.)
    grp = scores.double().view(-1, k)
    expected = ((grp - grp.mean(-1, keepdim=True)) / (grp.std(-1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(adv.double(), expected[:, None] * mask, atol=1e-5, rtol=1e-5)


def test_whitening_over_valid_tokens(tmp_path):
    tr = _trainer(tmp_path, algo="rloo", num_generations=2, whiten_advantages=True)
    lp, ref, mask, scores = _rollout_like(8, 5, seed=2)
    adv = tr.compute_advantages(lp, ref, mask, scores, 0.0).advantages
    vals = adv[mask].double()
    assert abs(vals.mean().item()) < 1e-6 and abs(vals.std().item() - 1.0) < 1e-4
    assert (adv[~mask] == 0).all()


# ---- losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-sum-norm"])
def test_loss_aggregation_formulas_and_split_invariance(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])
    mask = torch.arange(5)[None] < lengths[:, None]
    m = mask.double()
    expected = {
        "token-mean": (loss * m).sum() / m.sum(),
        "seq-mean-token-sum": (loss * m).sum(-1).mean(),
        "seq-mean-token-mean": ((loss * m).sum(-1) / lengths.clamp(min=1)).mean(),
        "seq-sum-norm": (loss * m).sum() / (6 * 5),
    }[mode]
    denom = agg_denominator(mode, float(m.sum()), 6.0, 5)
    whole = agg_numerator(loss, mask, mode) / denom
    split = (agg_numerator(loss[:2], mask[:2], mode) + agg_numerator(loss[2:], mask[2:], mode)) / denom
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(split, expected)


def test_clipped_policy_loss_asymmetric_and_dual_clip():
    lp = torch.log(torch.tensor([1.5, 0.5, 5.0, 1.1]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clipped = clipped_policy_loss(lp, old, adv, eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0)
    # r = 1.5, A>0: min(r, 1.28)·A → −1.28; r = 0.5, A<0: max(−r·A, −0.8·A)... → 0.8 (clipped)
    # r = 5, A<0: max(5, 1.28) = 5, dual clip min(5, 3) = 3; r = 1.1 unclipped → −1.1
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 3.0, -1.1]))
    assert clipped.tolist() == [True, True, True, False]


def test_adaptive_kl_controller_formula():
    c = AdaptiveKL(0.1, target=2.0, horizon=100)
    c.update(kl=3.0, n=10)    # err = 0.5 → clipped to 0.2
    assert math.isclose(c.beta, 0.1 * (1 + 0.2 * 10 / 100))
    b = c.beta
    c.update(kl=1.8, n=10)    # err = −0.1
    assert math.isclose(c.beta, b * (1 - 0.1 * 10 / 100))
    fixed = AdaptiveKL(0.1, None, 100)
    fixed.update(5.0, 10)
    assert fixed.beta == 0.1


# ---- rewards -----------------------------------------------------------------------------------

def test_distributional_reward_utility_and_quantile_metrics(tmp_path):
    cfg = cfg_for(tmp_path, utility="cvar:0.25", max_steps=1, per_device_train_batch_size=4)
    res = train_policy(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=quantile_reward)
    m = res["metrics"]
    for t in ("0.05", "0.1", "0.25"):
        assert f"reward_quantile/{t}" in m
    assert m["reward_quantile/0.05"] < m["reward_quantile/0.1"] < m["reward_quantile/0.25"] <= m["reward"] + 1e-9
    assert m["utility"] < m["reward"]  # CVaR of the lower tail sits below the mean (spread > 0)


def test_scalar_reward_with_risk_utility_is_an_error(tmp_path):
    tr = PolicyTrainer(cfg_for(tmp_path, utility="cvar:0.1"), model=make_policy(), tokenizer=make_tokenizer(),
                       prompts=PROMPTS, reward=count_a)
    with pytest.raises(ValueError, match="needs a distributional reward"):
        tr.train_step()


def test_sequence_classifier_reward_path(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=19, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=PAD))
    rm.save_pretrained(tmp_path / "rm")
    make_tokenizer(tmp_path / "rm")
    res = train_policy(cfg_for(tmp_path, max_steps=1), model=make_policy(), tokenizer=make_tokenizer(),
                       prompts=PROMPTS, reward=str(tmp_path / "rm"))
    assert math.isfinite(res["metrics"]["reward"]) and res["metrics"]["reward_std"] > 0


# ---- end to end --------------------------------------------------------------------------------

EASY = dict(num_generations=4, per_device_train_batch_size=4, max_completion_length=6, max_steps=6,
            learning_rate=3e-2, kl_coef=0.01)


@pytest.fixture(scope="module")
def rloo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rloo")
    cfg = PolicyConfig(algo="rloo", out=str(out), no_progress=True, **EASY)
    train_policy(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    return out, read_metrics(out)


def test_rloo_utility_rises_and_outputs(rloo_run):
    out, recs = rloo_run
    assert [r["step"] for r in recs] == list(range(1, 7))
    first = sum(r["utility"] for r in recs[:2]) / 2
    last = sum(r["utility"] for r in recs[-2:]) / 2
    assert last > first + 0.1, (first, last)
    for key in ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio",
                "clip_ratio", "step_time", "utility", "kl_coef", "tokens_per_s", "time/generate", "time/score",
                "time/update", "loss", "grad_norm"):
        assert key in recs[-1], key
    from transformers import AutoModelForCausalLM

    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    AutoModelForCausalLM.from_pretrained(out / "policy")


def test_adaptive_kl_moves_beta_toward_the_kl_target(tmp_path):
    """β follows err = clip(KL/target − 1, ±0.2), β ← β·(1 + err·n/horizon) step by step (n = 16
    completions per step): it falls while the policy is still close to the reference (KL < target)
    and rises once the reward pushes KL above the target."""
    target, horizon = 1.0, 8
    cfg = PolicyConfig(algo="rloo", out=str(tmp_path / "adaptive"), no_progress=True, target_kl=target,
                       kl_horizon=horizon, **{**EASY, "kl_coef": 0.2})
    trainer = PolicyTrainer(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    trainer.train()
    recs = read_metrics(tmp_path / "adaptive")
    beta, betas = 0.2, []
    for r in recs:
        assert math.isclose(r["kl_coef"], beta, rel_tol=1e-12)
        err = max(-0.2, min(0.2, r["kl"] / target - 1))
        new = beta * (1 + err * 16 / horizon)
        assert (new > beta) == (r["kl"] > target)
        beta = new
        betas.append(beta)
    assert math.isclose(trainer.kl.beta, beta, rel_tol=1e-12)
    assert recs[0]["kl"] < target < recs[-1]["kl"]  # both regimes happen in this run
    assert betas[-1] > min(betas)


def test_ppo_value_loss_falls(tmp_path):
    cfg = PolicyConfig(algo="ppo", out=str(tmp_path / "ppo"), no_progress=True, num_ppo_epochs=2, **EASY)
    train_policy(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    recs = read_metrics(tmp_path / "ppo")
    vl = [r["value_loss"] for r in recs]
    assert sum(vl[-2:]) / 2 < 0.5 * sum(vl[:2]) / 2, vl
    assert any(r["clip_ratio"] > 0 for r in recs)  # the second epoch is off-policy: clipping is active
    assert (tmp_path / "ppo" / "value_head.safetensors").exists()


def test_grpo_with_kl_loss_term_runs(tmp_path):
    cfg = cfg_for(tmp_path, algo="grpo", kl_in_reward=False, kl_estimator="k3", loss_agg_mode="seq-sum-norm",
                  max_steps=2)
    res = train_policy(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    assert res["step"] == 2 and math.isfinite(res["metrics"]["loss"])


def test_train_rm_run_directory_as_the_reward(tmp_path):
    """A prefcore train-rm run (gmm on text through a tiny backbone) as the reward: the utility of
    each completion is the run's mean − α·Var, and the left-tail quantiles are logged."""
    from prefcore.cli import main
    from prefcore.data import save_jsonl
    from prefcore.data.synthetic import RatingsWorldConfig, make_ratings_world
    from prefcore.train.rm.scoring import RunScorer
    from python_tests.tiny_transformers import make_llama
    from python_tests.tiny_transformers import make_tokenizer as make_rm_tokenizer

    backbone = tmp_path / "backbone"
    make_llama(backbone)
    make_rm_tokenizer(backbone)
    world = make_ratings_world(torch.Generator().manual_seed(1), RatingsWorldConfig(num_items=40))
    save_jsonl(world.to_records(), tmp_path / "ratings.jsonl")
    run = tmp_path / "rm"
    assert main(["train-rm", "--method", "gmm", "--data", str(tmp_path / "ratings.jsonl"), "--backbone", str(backbone),
                 "--max_length", "48", "--steps", "10", "--batch_size", "16", "--progress", "false",
                 "--out", str(run)]) == 0
    cfg = cfg_for(tmp_path, utility="mean-var:0.5", max_steps=1, per_device_train_batch_size=2)
    trainer = PolicyTrainer(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=str(run))
    rec = trainer.train_step()
    ro = trainer.last_rollout
    scorer = RunScorer.load(str(run))
    expected = scorer.reward(ro["prompts"], ro["completions"], risk="mean-var", alpha=0.5).float()
    torch.testing.assert_close(ro["utility"], expected, atol=1e-5, rtol=1e-5)
    assert rec["reward_quantile/0.05"] < rec["reward_quantile/0.25"]


def test_lora_trains_only_adapters_and_the_reference_is_the_base(tmp_path):
    pytest.importorskip("peft")
    model = make_policy()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = cfg_for(tmp_path, use_lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-2, max_steps=2,
                  lora_target_modules="q_proj,v_proj")
    trainer = PolicyTrainer(cfg, model=model, tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    assert trainer.ref_model is None
    trainer.train_step()
    trainer.train_step()
    ro = trainer.last_rollout
    # the reference (adapters off) is the initial policy: compare with a fresh copy's log-probs
    fresh = make_policy().eval()
    for r in range(2):
        n = int(ro["mask"][r].sum())
        ref_lp, _ = unpadded_logprobs(fresh, trainer.prompt_tokens[ro["rows"][r]], ro["ids"][r, :n].tolist())
        torch.testing.assert_close(ro["ref_logprobs"][r, :n].double(), ref_lp, atol=2e-5, rtol=1e-5)
    sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
          for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(sd[k], base[k]) for k in base)  # frozen base
    assert float(ro["kl"].abs().sum()) > 0  # the adapters moved the policy


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    runs = []
    for gc in (False, True):
        cfg = cfg_for(tmp_path / str(gc), gradient_checkpointing=gc, max_steps=1)
        tr = PolicyTrainer(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
        m = tr.model
        on = getattr(m, "is_activation_checkpointing", None)
        assert (on if on is not None else m.is_gradient_checkpointing) == gc
        rec = tr.train_step()
        runs.append((rec, {k: v.clone() for k, v in tr.model.state_dict().items()}))
    (ra, wa), (rb, wb) = runs
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_step_is_finite(tmp_path):
    cfg = cfg_for(tmp_path, bf16=True, max_steps=1)
    tr = PolicyTrainer(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    rec = tr.train_step()
    assert all(math.isfinite(v) for v in rec.values())
    assert tr.last_rollout["old_logprobs"].dtype == torch.float32


def test_missing_eos_penalty_then_reward_clip(tmp_path):
    """One new token: a completion is truncated unless that token is EOS. The utility that enters
    the advantages is clamp(reward − penalty·truncated, ±reward_clip); the logged reward is the raw one."""
    cfg = cfg_for(tmp_path, max_completion_length=1, missing_eos_penalty=3.0, reward_clip=4.0, max_steps=1,
                  per_device_train_batch_size=4, num_generations=4)
    tr = PolicyTrainer(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS,
                       reward=lambda ps, cs, **kw: [5.0] * len(ps))
    rec = tr.train_step()
    ro = tr.last_rollout
    trunc = (ro["ids"][:, 0] != EOS)
    assert torch.equal(ro["truncated"].cpu(), trunc)
    expected = torch.where(trunc, torch.tensor(2.0), torch.tensor(4.0))
    torch.testing.assert_close(ro["utility"], expected)
    assert rec["reward"] == 5.0 and rec["completions/clipped_ratio"] == pytest.approx(float(trunc.float().mean()))


def test_any_causal_lm_gpt2_logprobs_and_a_step(tmp_path):
    """Not only Llama: GPT-2 (absolute positions, its own cache) gives the same log-probs as its
    full-logits forward under left padding, and trains a step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=19, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)).eval()
    prompts = [[3, 4, 5, 6], [7]]
    completions = [[8, 9, EOS], [10, 11, 12, 13]]
    pids, pmask = left_pad(prompts)
    cids = torch.tensor([[8, 9, EOS, PAD], [10, 11, 12, 13]])
    cmask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        lp, _, _ = completion_logprobs(model, pids, pmask, cids, cmask)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ref_lp, _ = unpadded_logprobs(model, p, c)
        torch.testing.assert_close(lp[i, :len(c)].double(), ref_lp, atol=2e-5, rtol=1e-5)
    res = train_policy(cfg_for(tmp_path, max_steps=1), model=model, tokenizer=make_tokenizer(), prompts=PROMPTS,
                       reward=count_a)
    assert res["step"] == 1 and math.isfinite(res["metrics"]["loss"])
