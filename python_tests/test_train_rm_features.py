"""prefcore.train.rm.features: the resumable on-disk feature cache for frozen backbones.

Features are compared with the transformers backbone run on each text alone (2e-5, fp32);
resumed runs must equal an uninterrupted run bit for bit (same batch size).
"""
from __future__ import annotations

import json

import pytest
import torch

from prefcore.train.rm.features import INDEX_NAME, extract_features, load_features, shard_name
from python_tests.tiny_transformers import HIDDEN, TEXTS, make_llama, make_tokenizer, token_ids

TEXTS_X2 = TEXTS + [t + " thanks" for t in TEXTS]  # 22 texts → 6 shards of 4 (last one holds 2)
SHARD, BATCH = 4, 3


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def backbone():
    return make_llama()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, backbone, tok):
    out = tmp_path_factory.mktemp("full")
    info = extract_features(backbone, tok, TEXTS_X2, out, batch_size=BATCH, shard_size=SHARD, max_length=32)
    return out, info, load_features(out)


def _alone(backbone, tok, texts, max_length=64):
    with torch.no_grad():
        return torch.stack([backbone(input_ids=torch.tensor([token_ids(tok, t)[:max_length]])).last_hidden_state[0, -1]
                            for t in texts])


def test_features_match_each_text_alone(full_run, backbone, tok):
    out, info, feats = full_run
    assert info.num_texts == 22 and info.num_shards == 6 and info.hidden_size == HIDDEN
    assert info.computed == tuple(range(6))
    assert feats.shape == (22, HIDDEN) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, _alone(backbone, tok, TEXTS_X2), rtol=0, atol=2e-5)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["complete"] and [index["shards"][str(s)]["rows"] for s in range(6)] == [4, 4, 4, 4, 4, 2]


def test_prompt_only_features_and_truncation(tmp_path, backbone, tok):
    prompts = ["please answer this question", "the cat sat on the mat under the rug"]
    extract_features(backbone, tok, prompts, tmp_path, batch_size=2, shard_size=8, max_length=3, pooling="mean")
    with torch.no_grad():
        ref = torch.stack([backbone(input_ids=torch.tensor([token_ids(tok, p)[:3]])).last_hidden_state[0].mean(0)
                           for p in prompts])
    torch.testing.assert_close(load_features(tmp_path), ref, rtol=0, atol=2e-5)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(tmp_path, full_run, backbone, tok):
    calls = {"n": 0}

    def stop_after_five_batches(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] > 5:  # shard 0 has batches of 3+1, shard 1 of 3+1: dies inside shard 2
            raise Interrupt

    backbone.train()
    handle = backbone.register_forward_pre_hook(stop_after_five_batches, with_kwargs=True)
    try:
        with pytest.raises(Interrupt):
            extract_features(backbone, tok, TEXTS_X2, tmp_path, batch_size=BATCH, shard_size=SHARD, max_length=32)
    finally:
        handle.remove()
    assert backbone.training  # the caller's mode is restored even after a failure
    backbone.eval()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert sorted(index["shards"]) == ["0", "1"] and not index["complete"]
    with pytest.raises(ValueError, match=r"incomplete: shards \[2, 3, 4, 5\] of 6 missing"):
        load_features(tmp_path)

    info = extract_features(backbone, tok, TEXTS_X2, tmp_path, batch_size=BATCH, shard_size=SHARD, max_length=32)
    assert info.computed == (2, 3, 4, 5)  # complete shards are kept, not recomputed
    assert torch.equal(load_features(tmp_path), full_run[2])
    again = extract_features(backbone, tok, TEXTS_X2, tmp_path, batch_size=BATCH, shard_size=SHARD, max_length=32)
    assert again.computed == ()


def test_deleted_or_corrupt_shard_is_recomputed(tmp_path, full_run, backbone, tok):
    kw = dict(batch_size=BATCH, shard_size=SHARD, max_length=32)
    extract_features(backbone, tok, TEXTS_X2, tmp_path, **kw)
    (tmp_path / shard_name(5)).unlink()
    with pytest.raises(ValueError, match="missing or does not match the hash"):
        load_features(tmp_path)
    (tmp_path / shard_name(1)).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="missing or does not match the hash"):
        load_features(tmp_path)
    # a shard written but not yet recorded (killed between the two writes) is not trusted
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    del index["shards"]["3"]
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    info = extract_features(backbone, tok, TEXTS_X2, tmp_path, **kw)
    assert info.computed == (1, 3, 5)
    assert torch.equal(load_features(tmp_path), full_run[2])


def test_changed_arguments_are_refused(full_run, backbone, tok):
    out = full_run[0]
    with pytest.raises(ValueError, match=r"differs in \['num_texts', 'texts_sha256'\]"):
        extract_features(backbone, tok, TEXTS_X2[:-1], out, batch_size=BATCH, shard_size=SHARD, max_length=32)
    with pytest.raises(ValueError, match=r"differs in \['shard_size'\]"):
        extract_features(backbone, tok, TEXTS_X2, out, batch_size=BATCH, shard_size=5, max_length=32)
    with pytest.raises(ValueError, match=r"differs in \['backbone_config_sha256'"):
        extract_features(make_llama_wider(), tok, TEXTS_X2, out, batch_size=BATCH, shard_size=SHARD, max_length=32)


def make_llama_wider():
    from transformers import LlamaConfig, LlamaModel

    cfg = make_llama().config.to_dict()
    cfg["intermediate_size"] = 48
    return LlamaModel(LlamaConfig(**cfg)).eval()


def test_empty_text_list(tmp_path, backbone, tok):
    info = extract_features(backbone, tok, [], tmp_path, batch_size=2, shard_size=4)
    assert info.num_shards == 0
    assert load_features(tmp_path).shape == (0, HIDDEN)


def test_bad_arguments(tmp_path, backbone, tok):
    with pytest.raises(TypeError, match="texts must be a sequence of strings, got str"):
        extract_features(backbone, tok, "the cat", tmp_path)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        extract_features(backbone, tok, ["a", 3], tmp_path)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        extract_features(backbone, tok, ["a"], tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        extract_features(backbone, tok, ["a"], tmp_path, shard_size=-1)
    with pytest.raises(ValueError, match="pooling must be one of"):
        extract_features(backbone, tok, ["a"], tmp_path, pooling="cls")
    with pytest.raises(ValueError, match="dtype must be one of"):
        extract_features(backbone, tok, ["a"], tmp_path, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"texts\[1\] tokenizes to zero tokens"):
        extract_features(backbone, tok, ["a cat", ""], tmp_path / "e")
    with pytest.raises(ValueError, match="holds no feature cache"):
        load_features(tmp_path / "nothing")
