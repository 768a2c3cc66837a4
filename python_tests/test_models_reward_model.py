"""RewardModel on tiny local transformers backbones: pooling invariance, heads, freezing, save/load.

References are computed by running the transformers backbone directly on each sequence alone,
unpadded (no prefcore code involved). Batched fp32 results must match them to 2e-5.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from prefcore.models import (
    GatingNetwork,
    GMMHead,
    GMMHeadConfig,
    MeanVarianceHead,
    MixtureParams,
    QuantileHead,
    QuantileHeadConfig,
    RewardModel,
    ScalarHead,
    pooled_features,
)
from prefcore.models.reward_model import BACKBONE_SUBFOLDER, CONFIG_NAME, HEAD_WEIGHTS_NAME
from python_tests.tiny_transformers import HIDDEN, TEXTS, make_gpt2, make_llama, make_tokenizer, pad_batch, token_ids

ATOL = 2e-5


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_llama(path)
    return path


class NoPositionIds(nn.Module):
    """A backbone whose forward does not accept position_ids (it counts positions from the left)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


BACKBONES = {"llama": make_llama, "gpt2": make_gpt2, "gpt2-no-position-ids": lambda: NoPositionIds(make_gpt2())}


def _alone(backbone: nn.Module, rows: list[list[int]], pooling: str) -> torch.Tensor:
    """Reference: each sequence run alone, unpadded, straight through the backbone."""
    out = []
    with torch.no_grad():
        for r in rows:
            h = backbone(input_ids=torch.tensor([r])).last_hidden_state[0]
            out.append(h[-1] if pooling == "last" else h.mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_independent_of_padding_and_batch(name, pooling, tok):
    backbone = BACKBONES[name]()
    rows = [token_ids(tok, t) for t in TEXTS]
    assert len({len(r) for r in rows}) > 4  # lengths really differ, so there is padding
    ref = _alone(backbone, rows, pooling)
    with torch.no_grad():
        for side in ("left", "right"):
            for bs in (1, 3, len(rows)):
                got = torch.cat([pooled_features(backbone, *pad_batch(rows[i:i + bs], side), pooling)
                                 for i in range(0, len(rows), bs)])
                torch.testing.assert_close(got, ref, rtol=0, atol=ATOL, msg=f"{side} padding, batch {bs}")


def test_left_padding_matters_without_our_handling(tok):
    """Sensitivity check: naive last-column pooling of a left-padded GPT-2 batch (absolute positions
    counted from the left) is wrong, so the invariance test above can fail."""
    backbone = make_gpt2()
    rows = [token_ids(tok, t) for t in TEXTS]
    ids, mask = pad_batch(rows, "left")
    with torch.no_grad():
        naive = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
    assert (naive - _alone(backbone, rows, "last")).abs().max() > 1e-2


def test_interior_padding_is_skipped(tok):
    backbone = make_llama()
    r = token_ids(tok, "the cat sat on the mat")
    ids = torch.tensor([r[:3] + [0, 0] + r[3:]])
    mask = torch.tensor([[1, 1, 1, 0, 0] + [1] * (len(r) - 3)])
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(backbone, ids, mask), _alone(backbone, [r], "last"), rtol=0, atol=ATOL)


def test_causal_lm_backbone_uses_base_model(tok):
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(make_llama().config).eval()
    rows = [token_ids(tok, t) for t in TEXTS[:4]]
    with torch.no_grad():
        got = pooled_features(lm, *pad_batch(rows, "left"))
    assert got.shape == (4, HIDDEN)
    torch.testing.assert_close(got, _alone(lm.model, rows, "last"), rtol=0, atol=ATOL)


# ---- heads on the model ----------------------------------------------------------------------

def test_forward_and_reward_distribution(tok):
    backbone = make_llama()
    rows = [token_ids(tok, t) for t in TEXTS[:5]]
    ids, mask = pad_batch(rows, "right")
    feats = _alone(backbone, rows, "last")

    qm = RewardModel(backbone, QuantileHead(HIDDEN, num_attributes=3, non_crossing=True))
    with torch.no_grad():
        q = qm.reward_distribution(ids, mask)
        assert q.shape == (5, 3, 19)
        torch.testing.assert_close(q, qm.head(feats), rtol=0, atol=1e-4)

        gm = RewardModel(backbone, GMMHead(HIDDEN, k=3))
        p = gm.reward_distribution(ids, mask)
        assert isinstance(p, MixtureParams) and p.mu.shape == (5, 3)

        mv = RewardModel(backbone, MeanVarianceHead(HIDDEN))
        mean, log_var = mv(ids, mask)
        p1 = mv.reward_distribution(ids, mask)
        assert all(t.shape == (5, 1) for t in p1)
        torch.testing.assert_close(p1.mu[:, 0], mean)
        torch.testing.assert_close(p1.log_sigma[:, 0], 0.5 * log_var)
        torch.testing.assert_close(p1.logits, torch.zeros(5, 1))

        assert RewardModel(backbone, ScalarHead(HIDDEN))(ids, mask).shape == (5,)
        g = RewardModel(backbone, GatingNetwork(HIDDEN, 4, hidden=8))(ids, mask)
        torch.testing.assert_close(g.sum(-1), torch.ones(5))
    with pytest.raises(TypeError, match="reward_distribution needs a distributional head"):
        RewardModel(backbone, ScalarHead(HIDDEN)).reward_distribution(ids, mask)


def test_from_pretrained_backbone_frozen(llama_dir, tok):
    model = RewardModel.from_pretrained_backbone(llama_dir, {"kind": "quantile", "num_attributes": 2})
    assert model.head.config == QuantileHeadConfig(HIDDEN, 2)  # in_features filled from the backbone
    assert model.backbone_frozen and not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert model.head.training and not model.backbone.training  # frozen features never see dropout
    rows = [token_ids(tok, t) for t in TEXTS[:4]]
    q = model(*pad_batch(rows, "left"))
    q.sum().backward()
    assert model.head.linear.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    # the backbone is the saved one
    ref = make_llama()
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(), ref.state_dict().values()))

    trainable = RewardModel.from_pretrained_backbone(llama_dir, GMMHeadConfig(HIDDEN), freeze_backbone=False)
    trainable(*pad_batch(rows, "right")).mu.sum().backward()
    assert all(p.grad is not None for p in trainable.backbone.parameters() if p.requires_grad)
    assert any(p.requires_grad for p in trainable.backbone.parameters())


# ---- save / load -----------------------------------------------------------------------------

def _outputs_equal(a, b) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("head_config", [
    {"kind": "quantile", "num_attributes": 2, "taus": [0.1, 0.5, 0.9], "non_crossing": True},
    {"kind": "gmm", "k": 2, "min_sigma": 0.01, "max_sigma": 100.0},
    {"kind": "gating", "num_attributes": 3, "hidden": 8},
])
def test_save_load_round_trip_copy(llama_dir, tmp_path, tok, head_config):
    model = RewardModel.from_pretrained_backbone(llama_dir, head_config, freeze_backbone=False, pooling="mean")
    with torch.no_grad():
        for p in model.parameters():  # not the initial values: the save must carry the trained weights
            p.add_(0.01 * torch.randn_like(p))
    ids, mask = pad_batch([token_ids(tok, t) for t in TEXTS], "left")
    model.save(tmp_path / "rm")
    assert sorted(os.listdir(tmp_path / "rm")) == sorted([CONFIG_NAME, HEAD_WEIGHTS_NAME, BACKBONE_SUBFOLDER])
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.pooling == "mean" and not loaded.backbone_frozen
    assert loaded.head.config == model.head.config
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert _outputs_equal(model(ids, mask), loaded(ids, mask))


def test_save_twice_replaces_and_keeps_dtype(llama_dir, tmp_path, tok):
    model = RewardModel.from_pretrained_backbone(llama_dir, {"kind": "scalar"})
    model.save(tmp_path / "rm")
    model.head.to(torch.float64)
    with torch.no_grad():
        model.head.linear.bias.fill_(3.0)
    model.save(tmp_path / "rm")
    assert sorted(os.listdir(tmp_path / "rm")) == sorted([CONFIG_NAME, HEAD_WEIGHTS_NAME, BACKBONE_SUBFOLDER])  # no temp leftovers
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.backbone_frozen and loaded.head.linear.weight.dtype == torch.float64
    ids, mask = pad_batch([token_ids(tok, t) for t in TEXTS[:3]], "right")
    assert torch.equal(model(ids, mask), loaded(ids, mask))


def test_save_load_reference_backbone(tmp_path, tok):
    bb = tmp_path / "bb"
    make_llama(bb)
    model = RewardModel.from_pretrained_backbone(bb, {"kind": "quantile"})
    model.save(tmp_path / "rm", backbone="reference")
    assert not (tmp_path / "rm" / BACKBONE_SUBFOLDER).exists()
    cfg = json.loads((tmp_path / "rm" / CONFIG_NAME).read_text())
    assert cfg["backbone"]["mode"] == "reference" and cfg["backbone"]["path"] == str(bb.resolve())
    loaded = RewardModel.load(tmp_path / "rm")
    ids, mask = pad_batch([token_ids(tok, t) for t in TEXTS], "right")
    assert torch.equal(model(ids, mask), loaded(ids, mask))
    make_llama(bb, seed=1)  # the referenced weights change under the checkpoint
    with pytest.raises(ValueError, match="changed since this model was saved"):
        RewardModel.load(tmp_path / "rm")
    with pytest.raises(ValueError, match="backbone='reference' needs a frozen backbone"):
        RewardModel(make_llama(), ScalarHead(HIDDEN)).save(tmp_path / "x", backbone="reference")


def test_load_detects_a_mixed_save(llama_dir, tmp_path):
    RewardModel.from_pretrained_backbone(llama_dir, {"kind": "scalar"}).save(tmp_path / "a")
    other = RewardModel.from_pretrained_backbone(llama_dir, {"kind": "scalar"})
    other.save(tmp_path / "b")
    os.replace(tmp_path / "b" / HEAD_WEIGHTS_NAME, tmp_path / "a" / HEAD_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="does not match the hash"):
        RewardModel.load(tmp_path / "a")
    with pytest.raises(ValueError, match="is not a saved RewardModel"):
        RewardModel.load(tmp_path / "missing")


# ---- bad arguments ---------------------------------------------------------------------------

def test_bad_arguments(llama_dir, tmp_path):
    backbone = make_llama()
    with pytest.raises(ValueError, match=r"pooling must be one of \('last', 'mean'\), got 'first'"):
        RewardModel(backbone, ScalarHead(HIDDEN), pooling="first")
    with pytest.raises(ValueError, match="head in_features must equal the backbone hidden size 16, got in_features=8"):
        RewardModel(backbone, QuantileHead(8))
    with pytest.raises(ValueError, match="head in_features must equal the backbone hidden size"):
        RewardModel.from_pretrained_backbone(llama_dir, QuantileHeadConfig(32))
    with pytest.raises(TypeError, match="head must be a prefcore head .*got Linear"):
        RewardModel(backbone, nn.Linear(HIDDEN, 1))
    with pytest.raises(ValueError, match="local directory with a config.json"):
        RewardModel.from_pretrained_backbone(tmp_path / "nope", {"kind": "scalar"})
    with pytest.raises(ValueError, match="k must be >= 1"):
        RewardModel.from_pretrained_backbone(llama_dir, {"kind": "gmm", "k": 0})
    with pytest.raises(ValueError, match="backbone must be one of"):
        RewardModel(backbone, ScalarHead(HIDDEN)).save(tmp_path / "x", backbone="link")

    model = RewardModel(backbone, ScalarHead(HIDDEN))
    ids = torch.tensor([[3, 4, 5], [6, 7, 0]])
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\), got \(3,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 3\), got \(2, 2\)"):
        model(ids, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rows \[1\] of attention_mask have none"):
        model(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        model(ids, torch.tensor([[1, 1, 2], [1, 1, 0]]))
    with pytest.raises(ValueError, match="attention_mask must be bool or integer"):
        model(ids, torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one sequence"):
        model(ids[:0])
    with pytest.raises(ValueError, match=r"input_ids must be on the backbone's device \(cpu\), got meta"):
        model(ids.to("meta"), torch.ones(2, 3, dtype=torch.bool, device="meta"))
