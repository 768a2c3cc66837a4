"""Tiny randomly initialised transformers backbones and a local word-level tokenizer for tests.

Nothing is downloaded: the tokenizer is built from a fixed vocabulary with ``tokenizers`` and
the models from small configs; both are saved with ``save_pretrained`` into a given folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a cat dog bird sat ran on under mat rug good bad very quite not is was it this "
         "that helpful harmful answer question please thanks").split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}
HIDDEN = 16

TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "please answer this question it is very helpful",
    "bad",
    "the bird was not quite good",
    "thanks",
    "that dog ran under the rug and the cat sat",  # "and" is unknown → [UNK]
    "it is",
    "this answer was harmful",
    "a cat a dog a bird",
    "the",
]


def make_tokenizer(path: Path | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def make_llama(path: Path | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=2, eos_token_id=2)
    model = LlamaModel(cfg).eval()
    if path is not None:
        model.save_pretrained(str(path))
    return model


def make_gpt2(path: Path | None = None, seed: int = 0):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=2, eos_token_id=2, pad_token_id=0)
    model = GPT2Model(cfg).eval()
    if path is not None:
        model.save_pretrained(str(path))
    return model


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def pad_batch(rows: list[list[int]], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists on ``side`` ("left"/"right") → ``input_ids``, int64 0/1 ``attention_mask``."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask
