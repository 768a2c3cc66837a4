"""Exact resume and DDP equivalence of policy training."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from prefcore.train.policy import PolicyConfig, PolicyTrainer, train_policy
from prefcore.train.policy.trainer import TIMING_KEYS
from python_tests.test_train_policy_common import PROMPTS, count_a, ddp_worker, make_policy, make_tokenizer, read_metrics

SETTINGS = dict(num_generations=2, per_device_train_batch_size=4, max_completion_length=5, max_steps=4,
                learning_rate=2e-2, kl_coef=0.05, save_steps=2, no_progress=True)


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def _weights(run_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(os.path.join(run_dir, "policy")).state_dict()


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_resume_is_bit_identical(tmp_path, algo):
    extra = {"num_ppo_epochs": 2} if algo == "ppo" else {}
    full = PolicyConfig(algo=algo, out=str(tmp_path / "full"), **SETTINGS, **extra)
    train_policy(full, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)

    part = PolicyConfig(algo=algo, out=str(tmp_path / "part"), **SETTINGS, **extra)
    first = PolicyTrainer(part, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    first.train(until=2)  # "interrupted" after the step-2 checkpoint
    assert len(read_metrics(tmp_path / "part")) == 2 and not (tmp_path / "part" / "policy").exists()
    again = PolicyConfig(algo=algo, out=str(tmp_path / "part"), resume=True, **SETTINGS, **extra)
    train_policy(again, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)

    assert _strip(read_metrics(tmp_path / "part")) == _strip(read_metrics(tmp_path / "full"))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if algo == "ppo":
        from safetensors.torch import load_file

        va, vb = (load_file(str(d / "value_head.safetensors")) for d in (tmp_path / "full", tmp_path / "part"))
        assert all(torch.equal(va[k], vb[k]) for k in va)


def test_resume_refuses_changed_settings_and_other_initial_policy(tmp_path):
    cfg = PolicyConfig(out=str(tmp_path / "r"), **{**SETTINGS, "max_steps": 2})
    train_policy(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    changed = PolicyConfig(out=str(tmp_path / "r"), resume=True, **{**SETTINGS, "max_steps": 3, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"resume: the configuration differs .*learning_rate"):
        PolicyTrainer(changed, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    same = PolicyConfig(out=str(tmp_path / "r"), resume=True, **{**SETTINGS, "max_steps": 3})
    with pytest.raises(ValueError, match="initial policy differs"):
        PolicyTrainer(same, model=make_policy(seed=1), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        PolicyTrainer(PolicyConfig(out=str(tmp_path / "none"), resume=True, **SETTINGS), model=make_policy(),
                      tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 gloo ranks × 2 prompts per rank = 1 process × 4 prompts: same global batch, same sampling
    streams; metrics and final weights agree within fp tolerance. PPO (value head under DDP, two
    epochs) with advantage whitening across ranks; one case only (each spawn costs ~15 s on 2 cores)."""
    algo = "ppo"
    import torch.multiprocessing as mp

    common = dict(algo=algo, num_generations=2, max_completion_length=5, max_steps=2, learning_rate=2e-2,
                  kl_coef=0.05, no_progress=True, whiten_advantages=True, device="cpu",
                  num_ppo_epochs=2 if algo == "ppo" else 1)
    one = PolicyConfig(out=str(tmp_path / "one"), per_device_train_batch_size=4, **common)
    train_policy(one, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)

    two = dict(out=str(tmp_path / "two"), per_device_train_batch_size=2, **common)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=ddp_worker, args=(r, 2, port, two, str(tmp_path / "w.pt"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    ra, rb = _strip(read_metrics(tmp_path / "one")), _strip(read_metrics(tmp_path / "two"))
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k
    wa, wb = _weights(tmp_path / "one"), torch.load(tmp_path / "w.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
