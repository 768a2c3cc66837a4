"""``train-policy --bf16`` on CPU: bfloat16 autocast around sampling, the log-prob passes and the
value head, fp32 master weights and optimiser state; a short bf16 run's reward/KL curves track
fp32's."""
from __future__ import annotations

import math

import pytest
import torch

from prefcore.train.policy import PolicyConfig, PolicyTrainer
from prefcore.train.policy import logprobs as logprobs_mod
from python_tests.test_train_policy_common import PROMPTS, count_a, make_policy, make_tokenizer


def _cfg(tmp_path, name: str, **kw) -> PolicyConfig:
    base = dict(num_generations=4, max_completion_length=6, per_device_train_batch_size=4, max_steps=6,
                learning_rate=1e-2, kl_coef=0.05, out=str(tmp_path / name), no_progress=True, save_steps=100,
                device="cpu")
    base.update(kw)
    return PolicyConfig(**base)


def _recorder(monkeypatch) -> list[tuple[torch.dtype, torch.dtype, bool]]:
    """Record (hidden dtype, weight dtype, grad enabled) of every fused log-prob call the trainer makes."""
    calls: list[tuple[torch.dtype, torch.dtype, bool]] = []
    inner = logprobs_mod.token_logprobs

    def spy(hidden, weight, *a, **kw):
        calls.append((hidden.dtype, weight.dtype, torch.is_grad_enabled()))
        return inner(hidden, weight, *a, **kw)

    monkeypatch.setattr(logprobs_mod, "token_logprobs", spy)
    return calls


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_bf16_cpu_step_runs_in_bf16_with_fp32_master_weights(tmp_path, monkeypatch, algo):
    calls = _recorder(monkeypatch)
    model = make_policy()
    tr = PolicyTrainer(_cfg(tmp_path, algo, bf16=True, algo=algo, max_steps=2), model=model,
                       tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    # Observable autocast: every trunk linear (sampling and log-prob passes) returns bf16.
    mlp_out: list[torch.dtype] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: mlp_out.append(o.dtype))
    vh_out: list[torch.dtype] = []
    if tr.module.value_head is not None:
        tr.module.value_head.register_forward_hook(lambda m, i, o: vh_out.append(o.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recs = [tr.train_step() for _ in range(2)]

    assert all(math.isfinite(v) for r in recs for v in r.values())
    assert mlp_out and set(mlp_out) == {torch.bfloat16}
    # The fused op ran in bf16 (hidden states and the per-call cast of the LM head) in the no-grad
    # old-policy/reference passes and in the differentiated loss pass.
    assert {c[:2] for c in calls} == {(torch.bfloat16, torch.bfloat16)}
    assert {c[2] for c in calls} == {True, False}
    if algo == "ppo":
        assert vh_out and set(vh_out) == {torch.bfloat16}
        assert tr.last_rollout["values"].dtype == torch.float32
    assert tr.last_rollout["old_logprobs"].dtype == torch.float32
    # fp32 master weights, gradients and AdamW moments; and the weights moved.
    params = list(tr.module.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params)
    states = [s for s in tr.optimizer.state.values() if s]
    assert states and all(v.dtype == torch.float32 for s in states for k, v in s.items() if k != "step")
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in moved and len(moved) > len(before) // 2


def test_fp32_run_keeps_the_fused_op_in_fp32(tmp_path, monkeypatch):
    calls = _recorder(monkeypatch)
    tr = PolicyTrainer(_cfg(tmp_path, "fp32", max_steps=1), model=make_policy(), tokenizer=make_tokenizer(),
                       prompts=PROMPTS, reward=count_a)
    tr.train_step()
    assert calls and {c[:2] for c in calls} == {(torch.float32, torch.float32)}


def _curves(tmp_path, name: str, **kw) -> dict[str, list[float]]:
    tr = PolicyTrainer(_cfg(tmp_path, name, **kw), model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS,
                       reward=count_a)
    recs = [tr.train_step() for _ in range(tr.cfg.max_steps)]
    return {k: [r[k] for r in recs] for k in ("reward", "reward_std", "kl")}


def test_bf16_reward_and_kl_curves_track_fp32(tmp_path):
    """Six steps of bf16 against fp32 from the same seed. Both runs draw the same per-completion
    sampling noise, so bf16 changes a sampled token only where its rounding (relative 2⁻⁸ on the
    logits) moves a CDF boundary across that noise, and its KL differs by the rounding of the
    log-probs. Tolerance — "within noise": the curves' sampling noise, measured by a second fp32
    run with another seed; bf16's mean absolute difference from fp32 over the steps must not
    exceed that seed-to-seed difference, for the reward and for the KL. Each step's mean reward
    must also lie within 3 standard errors (reward_std / √n over the step's n completions)."""
    ref = _curves(tmp_path, "fp32", seed=0)
    other = _curves(tmp_path, "fp32-seed1", seed=1)
    bf16 = _curves(tmp_path, "bf16", seed=0, bf16=True)
    n = 4 * 4  # completions per step: 4 prompts × 4 generations
    assert all(math.isfinite(x) for c in (ref, bf16) for k in c for x in c[k])
    for key in ("reward", "kl"):
        d_bf16 = sum(abs(a - b) for a, b in zip(bf16[key], ref[key])) / len(ref[key])
        d_seed = sum(abs(a - b) for a, b in zip(other[key], ref[key])) / len(ref[key])
        assert d_seed > 0 and d_bf16 <= d_seed, (key, d_bf16, d_seed, bf16[key], ref[key], other[key])
    for t, (a, b, sd) in enumerate(zip(bf16["reward"], ref["reward"], ref["reward_std"])):
        assert abs(a - b) <= 3 * sd / math.sqrt(n) + 1e-6, (t, a, b, sd)


def test_cli_bf16_flag_trains_on_cpu(tmp_path, monkeypatch):
    """``prefcore train-policy --bf16 --device cpu`` end to end: the flag reaches the trainer (the
    fused op runs in bf16), the run finishes, and the saved policy is fp32."""
    from prefcore.cli import main

    make_policy(path=tmp_path / "policy")
    make_tokenizer(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS[:4]))
    calls = _recorder(monkeypatch)
    rc = main(["train-policy", "--model_name_or_path", str(tmp_path / "policy"), "--dataset",
               str(tmp_path / "prompts.jsonl"), "--reward_model", "python_tests.test_train_policy_common:count_a",
               "--out", str(tmp_path / "run"), "--no_progress", "true", "--num_generations", "2",
               "--per_device_train_batch_size", "2", "--max_completion_length", "4", "--max_steps", "1",
               "--device", "cpu", "--bf16"])
    assert rc == 0
    assert calls and {c[:2] for c in calls} == {(torch.bfloat16, torch.bfloat16)}
    from transformers import LlamaForCausalLM

    saved = LlamaForCausalLM.from_pretrained(str(tmp_path / "run" / "policy"))
    assert all(p.dtype == torch.float32 for p in saved.parameters())
