"""Shared pieces of the policy-training tests (no tests here): a tiny random Llama causal LM, a
word-level tokenizer with pad and eos, easy Python rewards, and a DDP worker."""
from __future__ import annotations

import json
import os

import torch

WORDS = "a b c d e f g h i j k l m n o p".split()
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}
PAD, EOS = 0, 2
PROMPTS = ["a b c", "d e", "f g h i", "j", "k l", "m n o p", "b", "c d e f"]


def make_tokenizer(path=None, *, pad: bool = True, eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"unk_token": "[UNK]"}
    if pad:
        kw["pad_token"] = "[PAD]"
    if eos:
        kw["eos_token"] = "[EOS]"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def make_policy(seed: int = 0, hidden: int = 32, path=None, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
        model = LlamaForCausalLM(cfg).to(dtype)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def count_a(prompts, completions, **kw):
    """Easy reward: the share of 'a' words in the completion (an untrained policy rarely says it)."""
    return [c.split().count("a") / 6.0 for c in completions]


def length_reward(prompts, completions, **kw):
    return [len(c.split()) / 6.0 for c in completions]


def quantile_reward(prompts, completions, **kw):
    """A distributional reward: 5 quantiles centred on count_a with a spread that grows with 'b'."""
    from prefcore.distributions import QuantileDistribution

    taus = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    mean = torch.tensor(count_a(prompts, completions), dtype=torch.float64)
    spread = torch.tensor([0.1 + c.split().count("b") / 6.0 for c in completions], dtype=torch.float64)
    z = torch.tensor([-1.28, -0.52, 0.0, 0.52, 1.28], dtype=torch.float64)
    return QuantileDistribution(mean[:, None] + spread[:, None] * z, taus)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def ddp_worker(rank: int, world: int, port: int, cfg_kwargs: dict, out_file: str) -> None:
    """One rank of a gloo DDP run; rank 0 saves the final weights to ``out_file``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from prefcore.train.policy import PolicyConfig, train_policy

    cfg = PolicyConfig(**cfg_kwargs)
    train_policy(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=count_a)
    if rank == 0:
        from transformers import LlamaForCausalLM

        m = LlamaForCausalLM.from_pretrained(os.path.join(cfg.run_dir, "policy"))
        torch.save(m.state_dict(), out_file)
