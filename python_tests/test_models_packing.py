"""prefcore.models.packing: the prompt encoded once ([prompt|chosen|rejected] with a block mask)
gives the rewards and backbone gradients of the plain two-sequence forward.

The reference runs every sequence ``prompt + response`` alone, unpadded, through the tiny
backbone (no mask, default positions) and sums the per-pair losses — nothing of the code under
test is used for it. Tolerances are fp32 rounding of a 2-layer, 16-wide model.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from tiny_transformers import VOCAB, make_gpt2, make_llama, pad_batch

from prefcore.models.packing import pack_pairs, pair_features, resolve_packing

ATOL = 2e-5


def _rows(rng: random.Random, n: int, lo: int, hi: int) -> list[list[int]]:
    return [[rng.randrange(3, len(VOCAB)) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]


def _head(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 1)


def _bt_loss(head, fc: torch.Tensor, fr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rc, rr = head(fc).squeeze(-1), head(fr).squeeze(-1)
    return -F.logsigmoid(rc - rr).sum(), rc, rr


def _reference(model, head, prompts, chosen, rejected):
    """Rewards and parameter gradients of the plain forward, one unpadded sequence at a time."""
    model.zero_grad()
    rcs, rrs = [], []
    for p, c, r in zip(prompts, chosen, rejected):
        fc = model(input_ids=torch.tensor([p + c])).last_hidden_state[:, -1]
        fr = model(input_ids=torch.tensor([p + r])).last_hidden_state[:, -1]
        loss, rc, rr = _bt_loss(head, fc, fr)
        loss.backward()
        rcs.append(rc.detach())
        rrs.append(rr.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return torch.cat(rcs), torch.cat(rrs), grads


def _under_test(model, head, prompts, chosen, rejected, side, packing):
    model.zero_grad()
    p, c, r = (pad_batch(x, side) if any(x) else (torch.zeros(len(x), 0, dtype=torch.long),) * 2
               for x in (prompts, chosen, rejected))
    feats = pair_features(model, p, c, r, packing=packing)
    loss, rc, rr = _bt_loss(head, feats.chosen, feats.rejected)
    loss.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad()
    return rc.detach(), rr.detach(), grads, feats.mode


def _assert_matches(model, prompts, chosen, rejected, side, packing, expect_mode):
    head = _head()
    ref_c, ref_r, ref_g = _reference(model, head, prompts, chosen, rejected)
    rc, rr, grads, mode = _under_test(model, head, prompts, chosen, rejected, side, packing)
    assert mode == expect_mode
    torch.testing.assert_close(rc, ref_c, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(rr, ref_r, atol=ATOL, rtol=1e-5)
    assert grads.keys() == ref_g.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_g[name], atol=ATOL, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


CASES = {
    # odd, different lengths per segment and row
    "odd": (lambda rng: (_rows(rng, 4, 1, 7), _rows(rng, 4, 1, 5), _rows(rng, 4, 1, 9))),
    "batch_of_1": (lambda rng: (_rows(rng, 1, 5, 5), _rows(rng, 1, 3, 3), _rows(rng, 1, 6, 6))),
    "prompt_of_length_1": (lambda rng: ([[7], [9], [4]], _rows(rng, 3, 1, 4), _rows(rng, 3, 2, 6))),
    # a row whose prompt was truncated away (response longer than max_length) next to full rows
    "empty_prompt_row": (lambda rng: ([[], [5, 6, 7]], _rows(rng, 2, 2, 4), _rows(rng, 2, 1, 3))),
    "no_prompts": (lambda rng: ([[], []], _rows(rng, 2, 2, 4), _rows(rng, 2, 1, 3))),
}


# sdpa (transformers' default) for every case; eager (adds the mask to the scores) on the odd case
@pytest.mark.parametrize("case, attn", [(case, "sdpa") for case in CASES] + [("odd", "eager")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_equals_plain_llama(case, side, attn):
    model = make_llama().train()  # train mode: gradients flow as in fine-tuning (no dropout in Llama)
    model.set_attn_implementation(attn)
    prompts, chosen, rejected = CASES[case](random.Random(hash((case, side)) % 1000))
    _assert_matches(model, prompts, chosen, rejected, side, "packed", "packed")


def test_plain_mode_equals_reference():
    """Left padding puts padding between prompt and response in the concatenation: removed."""
    model = make_llama().train()
    prompts, chosen, rejected = CASES["odd"](random.Random(3))
    _assert_matches(model, prompts, chosen, rejected, "left", "plain", "plain")


def test_packed_gpt2_absolute_positions():
    """GPT-2 adds learned absolute position embeddings from position_ids: packing holds too."""
    model = make_gpt2()  # eval mode: GPT-2's dropout would differ between the two forwards
    prompts, chosen, rejected = CASES["odd"](random.Random(4))
    _assert_matches(model, prompts, chosen, rejected, "left", "auto", "packed")


def test_never_runs_the_lm_head():
    from transformers import LlamaForCausalLM

    base = make_llama()
    lm = LlamaForCausalLM(base.config).eval()
    lm.model.load_state_dict(base.state_dict())

    def refuse(*_):
        raise AssertionError("lm_head ran")

    lm.lm_head.register_forward_hook(refuse)
    rng = random.Random(5)
    p, c, r = (pad_batch(x, "right") for x in (_rows(rng, 3, 1, 4), _rows(rng, 3, 1, 4), _rows(rng, 3, 1, 4)))
    for packing in ("packed", "plain"):
        got = pair_features(lm, p, c, r, packing=packing)
        want = pair_features(base, p, c, r, packing=packing)
        assert got.chosen.shape == (3, 16)
        torch.testing.assert_close(got.chosen, want.chosen)
        torch.testing.assert_close(got.rejected, want.rejected)


def test_pack_pairs_layout():
    """prompt [11, 12], chosen [21], rejected [31, 32], left-padded inputs, next to a longer pair."""
    p = (torch.tensor([[0, 11, 12], [13, 14, 15]]), torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool))
    c = (torch.tensor([[0, 21], [22, 23]]), torch.tensor([[0, 1], [1, 1]], dtype=torch.bool))
    r = (torch.tensor([[31, 32], [0, 33]]), torch.tensor([[1, 1], [0, 1]], dtype=torch.bool))
    b = pack_pairs(p, c, r)
    assert b.input_ids[0].tolist() == [11, 12, 21, 31, 32, 0]
    assert b.position_ids[0].tolist() == [0, 1, 2, 2, 3, 0]
    assert b.segment[0].tolist() == [0, 0, 1, 2, 2, 3]
    assert b.input_ids[1].tolist() == [13, 14, 15, 22, 23, 33]
    assert b.position_ids[1].tolist() == [0, 1, 2, 3, 4, 3]
    assert (b.chosen_last.tolist(), b.rejected_last.tolist()) == ([2, 4], [4, 5])
    want = torch.tensor([  # query rows × key columns for pair 0
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # chosen: prompt + itself
        [1, 1, 0, 1, 0, 0],  # rejected: prompt, not chosen
        [1, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding: only itself
    ], dtype=torch.bool)
    assert torch.equal(b.allowed[0], want)


def test_resolve_packing():
    llama, gpt2 = make_llama(), make_gpt2()
    assert resolve_packing("auto", llama).mode == "packed"
    assert resolve_packing("auto", gpt2).mode == "packed"
    assert resolve_packing("plain", llama).mode == "plain"
    llama.config._attn_implementation = "flash_attention_2"  # not installed: only the config is read
    choice = resolve_packing("auto", llama)
    assert choice.mode == "plain" and "flash_attention_2" in choice.reason
    with pytest.raises(ValueError, match="packing='packed' is not supported.*flash_attention_2"):
        resolve_packing("packed", llama)
    llama.config._attn_implementation = "sdpa"
    llama.config.sliding_window = 8
    assert "sliding-window" in resolve_packing("auto", llama).reason
    plain_module = torch.nn.Linear(2, 2)
    assert resolve_packing("auto", plain_module).mode == "plain"
    with pytest.raises(ValueError, match="packing must be one of"):
        resolve_packing("yes", llama)


def test_resolve_packing_refuses_bidirectional_encoder():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=32))
    choice = resolve_packing("auto", bert)
    assert choice.mode == "plain" and "bidirectional" in choice.reason


def test_pair_features_bad_input():
    model = make_llama()
    p, c = pad_batch([[5, 6], [7]], "right"), pad_batch([[8], [9]], "right")
    with pytest.raises(ValueError, match="same number of rows"):
        pair_features(model, p, c, pad_batch([[8]], "right"))
    empty = (torch.tensor([[8], [9]]), torch.tensor([[1], [0]]))
    with pytest.raises(ValueError, match="rejected: every sequence needs at least one attended token"):
        pair_features(model, p, c, empty)
    with pytest.raises(TypeError, match="chosen must be a mapping"):
        pair_features(model, p, torch.tensor([[1]]), c)
    with pytest.raises(ValueError, match="packing must be one of"):
        pair_features(model, p, c, c, packing="both")


def test_peft_lora_wrapper():
    """A LoRA-wrapped causal LM: the inner base model runs (LoRA layers included, LM head not)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = make_llama()
    lm = LlamaForCausalLM(base.config)
    lm.model.load_state_dict(base.state_dict())
    peft_model = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert resolve_packing("auto", peft_model).mode == "packed"
    rng = random.Random(6)
    prompts, chosen, rejected = _rows(rng, 2, 1, 4), _rows(rng, 2, 1, 3), _rows(rng, 2, 1, 3)
    p, c, r = (pad_batch(x, "left") for x in (prompts, chosen, rejected))
    packed = pair_features(peft_model, p, c, r, packing="packed")
    # reference: the merged model (LoRA folded into the weights), each sequence alone
    merged = peft_model.merge_and_unload().model
    for i in range(2):
        torch.testing.assert_close(packed.chosen[i], merged(input_ids=torch.tensor([prompts[i] + chosen[i]])).last_hidden_state[0, -1],
                                   atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(packed.rejected[i], merged(input_ids=torch.tensor([prompts[i] + rejected[i]])).last_hidden_state[0, -1],
                                   atol=ATOL, rtol=1e-5)


# ---- rated texts packed several to a row (pack_texts / packed_text_features) --------------------

def test_pack_texts_layout():
    from prefcore.models.packing import pack_texts

    rows = [[5, 6, 7], [8], [9, 10], [11, 12, 13]]
    p = pack_texts(rows)
    assert p.input_ids.shape[1] == 3 and p.input_ids.shape[0] == 3  # widths 3, 3, 2+1: three rows
    for n, r in enumerate(rows):  # each text intact, positions from 0, its last token where `last` says
        sel = p.segment[p.row[n]] == n
        assert p.input_ids[p.row[n]][sel].tolist() == r and p.position_ids[p.row[n]][sel].tolist() == list(range(len(r)))
        assert int(p.last[n]) == int(sel.nonzero().max())
    q = p.segment.unsqueeze(2)
    k = p.segment.unsqueeze(1)
    assert not (p.allowed & (q != k)).any()  # no text sees another
    with pytest.raises(ValueError, match="at least one token"):
        pack_texts([[1], []])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_texts_equal_each_text_alone_with_gradients(attn):
    """Features and parameter gradients of ``packed_text_features`` equal the backbone run on each
    text alone (unpadded), to ATOL — the same tolerance as the pair packing."""
    from prefcore.models.packing import pack_texts, packed_text_features

    model = make_llama().train()
    model.set_attn_implementation(attn)
    head = _head()
    rows = _rows(random.Random(7), 9, 1, 14)
    model.zero_grad()
    want = []
    for r in rows:
        f = model(input_ids=torch.tensor([r])).last_hidden_state[:, -1]
        head(f).sum().backward()
        want.append(f.detach())
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = pack_texts(rows)
    assert packed.input_ids.shape[0] < len(rows)  # several texts share a row
    got = packed_text_features(model, packed)
    head(got).sum().backward()
    torch.testing.assert_close(got.detach(), torch.cat(want), atol=ATOL, rtol=1e-4)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want_grads[n], atol=ATOL, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_text_pack_width_trades_padding_against_attention():
    from prefcore.models.packing import PACK_WIDTHS, _first_fit, attention_per_token, pack_texts, text_pack_width
    from transformers import LlamaConfig

    rng = random.Random(0)
    lengths = [rng.randint(65, 145) for _ in range(32)]  # the rm_step bench's rated texts
    longest = max(lengths)
    a = attention_per_token(LlamaConfig(hidden_size=256, intermediate_size=688))
    assert a == pytest.approx(2 / (4 * 256 + 3 * 688))
    w = text_pack_width(lengths, a)
    assert w in {math.ceil(m * longest) for m in PACK_WIDTHS}
    rows = len(_first_fit(lengths, w))
    assert rows * w < 0.85 * len(lengths) * longest  # fewer token slots than one padded row per text
    assert rows * w * w <= 2 * len(lengths) * longest ** 2  # the mask stays within its budget
    assert text_pack_width(lengths, 1.0) == longest  # attention dear: one text per row
    packed = pack_texts([[1] * n for n in lengths], width=w)
    assert packed.input_ids.shape == (rows, w)
