"""The text world (prefcore.data.text_world): tokenizer, determinism, exact ground truth checked
against independent maths (scipy) and Monte Carlo, the contentious-minority property, pretraining,
and the record converters against prefcore.data.schemas."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, optimize
from scipy.stats import norm

from prefcore.data import load_pairs, load_ratings, parse_pair, parse_rating
from prefcore.data.text_world import (
    CONTENTIOUS_WORDS,
    VOCABULARY,
    TextWorld,
    TextWorldConfig,
    completion_words,
)

GOOD = "first the orbit means the moon because the planet explains a result"  # space topic
GOOD_EDGY = "first the orbit means the moon because the planet explains a edgy result"
PROMPT = "how does the orbit work ?"


@pytest.fixture(scope="module")
def world() -> TextWorld:
    return TextWorld()


@pytest.fixture(scope="module")
def pretrained(world):
    model = world.make_policy(seed=0)
    losses = world.pretrain(model, steps=80, seed=0, batch_size=32, corpus_size=1024)
    return model, losses


# ---- language and tokenizer -----------------------------------------------------------------


def test_tokenizer_round_trip_and_specials(world, tmp_path):
    from transformers import AutoTokenizer

    tok = world.tokenizer
    assert len(tok) == len(VOCABULARY)
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    text = f"{PROMPT} {GOOD_EDGY}"
    ids = tok(text)["input_ids"]
    assert ids[0] == VOCABULARY.index("<bos>")
    assert ids[1:] == [VOCABULARY.index(w) for w in text.split()]  # one id per word, in vocabulary order
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("zebra")["input_ids"][1:] == [VOCABULARY.index("<unk>")]
    # punctuation glued to a word is split like the pre-tokenizer does
    assert tok("work?")["input_ids"] == tok("work ?")["input_ids"]

    world.save(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again(text)["input_ids"] == ids
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    batch = again(["what is a moon ?", PROMPT], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_token_id  # left padding for generation


def test_prompts_deterministic_and_topical(world):
    a, b, c = world.prompts(50, seed=3), world.prompts(50, seed=3), world.prompts(50, seed=4)
    assert a == b and a != c
    assert all(p.endswith("?") for p in a)
    assert len(world.default_prompts()) == 48 and len(set(world.default_prompts())) == 48
    assert world.sample_completions(a, seed=1) == world.sample_completions(a, seed=1)


def test_policy_save_load_and_determinism(world, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    m1, m2, m3 = world.make_policy(seed=5), world.make_policy(seed=5), world.make_policy(seed=6)
    assert isinstance(m1, LlamaForCausalLM) and m1.config.vocab_size == len(VOCABULARY)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    # pretraining is deterministic for a seed
    l1 = world.pretrain(m1, steps=3, seed=1, batch_size=8, corpus_size=32)
    l2 = world.pretrain(m2, steps=3, seed=1, batch_size=8, corpus_size=32)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))

    world.save(tmp_path, model=m1)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = world.tokenizer([PROMPT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m1(ids).logits, rtol=0, atol=0)
    assert TextWorld.load(tmp_path).config == world.config
    assert loaded.config.eos_token_id == world.tokenizer.eos_token_id
    with pytest.raises(FileNotFoundError, match="text_world.json"):
        TextWorld.load(tmp_path / "missing")


def test_generate_deterministic(world, pretrained):
    model, _ = pretrained
    p = world.prompts(6, seed=2)
    assert world.generate(model, p, seed=9) == world.generate(model, p, seed=9)


# ---- exact ground truth -------------------------------------------------------------------------


def _independent_locations(world: TextWorld, n, h, m, o, c, r):
    """μ_t from the documented formula, with the features given by hand."""
    out = []
    for t in world.config.annotators:
        z = (t.bias + t.helpful * math.tanh(h / 2) + t.on_topic * math.tanh(m / 2) - t.off_topic * math.tanh(o / 2)
             - t.repetition * r + t.length * math.tanh((n - t.length_center) / 6) - t.empty * (n == 0)
             + t.contentious * (1 - math.exp(-2 * c)))
        out.append(math.tanh(z))
    return out


def _clipped_mean_quad(mu: float, sd: float) -> float:
    inner, _ = integrate.quad(lambda x: x * norm.pdf(x, mu, sd), -1, 1)
    return -norm.cdf(-1, mu, sd) + norm.sf(1, mu, sd) + inner


def test_features_and_type_means_match_independent_maths(world):
    # GOOD_EDGY: 13 words; helpful: first means because explains result = 5; space words: orbit moon
    # planet = 3; other topics 0; contentious 1; distinct 11 of 13 ("the" ×3) → r = 1 − 11/13.
    texts = [GOOD_EDGY, "wave wave wave", "", "snarky crude rant"]
    hand = [(13, 5, 3, 0, 1, 1 - 11 / 13), (3, 0, 0, 3, 0, 1 - 1 / 3), (0, 0, 0, 0, 0, 0.0), (3, 0, 0, 0, 3, 0.0)]
    loc = world.type_locations([PROMPT] * 4, texts)
    want = torch.tensor([_independent_locations(world, *f) for f in hand], dtype=torch.float64)
    torch.testing.assert_close(loc, want, rtol=0, atol=1e-12)
    means = world.true_type_means([PROMPT] * 4, texts)
    sd = world.type_noise
    want_means = torch.tensor([[_clipped_mean_quad(float(loc[i, t]), float(sd[t])) for t in range(loc.shape[1])]
                               for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(means, want_means, rtol=0, atol=1e-9)
    torch.testing.assert_close(world.mean_rating([PROMPT] * 4, texts), want_means @ world.type_weights, rtol=0, atol=1e-9)
    # text after <eos> and special tokens do not count
    torch.testing.assert_close(world.type_locations([PROMPT], [GOOD_EDGY + " <eos> crude crude"]), loc[:1])


def test_sampled_ratings_match_exact_distribution(world):
    prompts = [PROMPT, "what is a bread ?", PROMPT]
    comps = [GOOD_EDGY, "bread soup because oven", "the the the um"]
    n = 200_000
    g = torch.Generator().manual_seed(0)
    r, types = world.sample_ratings(prompts, comps, n, g, return_types=True)
    assert r.shape == (3, n) and r.dtype == torch.float32 and float(r.abs().max()) <= 1.0
    # type frequencies → weights (SE ≤ 0.0012), sample means → exact means (SE ≤ 1/sqrt(n) = 0.0022)
    freq = torch.stack([(types == t).double().mean() for t in range(len(world.type_names))])
    torch.testing.assert_close(freq, world.type_weights, rtol=0, atol=0.005)
    torch.testing.assert_close(r.double().mean(1), world.mean_rating(prompts, comps), rtol=0, atol=0.01)
    # per-type conditional means
    tm = world.true_type_means(prompts, comps)
    for t in range(tm.shape[1]):
        sel = types[0] == t
        assert abs(float(r[0][sel].double().mean()) - float(tm[0, t])) < 0.01
    # P(rating < −0.7) → frequency
    torch.testing.assert_close((r < -0.7).double().mean(1), world.prob_below(prompts, comps, -0.7), rtol=0, atol=0.005)
    # quantiles: exact vs an independent inversion (brentq on the clipped mixture CDF) and vs samples
    levels = [0.05, 0.1, 0.25, 0.5, 0.9]
    q = world.rating_quantiles(prompts, comps, levels)
    loc, sd, w = world.type_locations(prompts, comps), world.type_noise, world.type_weights
    for i in range(3):
        cdf = lambda x: float(sum(w[t] * norm.cdf(x, float(loc[i, t]), float(sd[t])) for t in range(len(w))))  # noqa: E731
        for j, lv in enumerate(levels):
            if cdf(-1.0) >= lv:  # mass of the atom at −1 covers the level
                want = -1.0
            elif cdf(1.0) < lv:
                want = 1.0
            else:
                want = optimize.brentq(lambda x: cdf(x) - lv, -1.0, 1.0, xtol=1e-12)
            assert abs(float(q[i, j]) - want) < 1e-7, (i, lv)
        emp = torch.quantile(r[i].double(), torch.tensor(levels, dtype=torch.float64))
        torch.testing.assert_close(emp, q[i], rtol=0, atol=0.02)
    cdf_pts = world.rating_cdf(prompts, comps, torch.tensor([-1.5, -0.3, 0.2, 1.0]))
    torch.testing.assert_close(cdf_pts[:, 1:3], (r[:, None, :] <= torch.tensor([-0.3, 0.2])[None, :, None]).double().mean(-1),
                               rtol=0, atol=0.005)
    assert bool((cdf_pts[:, 0] == 0).all()) and bool((cdf_pts[:, 3] == 1).all())


def test_votes_match_exact_probability(world):
    prompts = [PROMPT, PROMPT]
    a, b = [GOOD, GOOD_EDGY], [GOOD_EDGY, "the um"]
    p = world.vote_probability(prompts, a, b)
    loc_a, loc_b = world.type_locations(prompts, a), world.type_locations(prompts, b)
    sd, w = world.type_noise.numpy(), world.type_weights.numpy()
    want = [(w * norm.cdf((loc_a[i].numpy() - loc_b[i].numpy()) / (sd * math.sqrt(2)))).sum() for i in range(2)]
    torch.testing.assert_close(p, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    v = world.sample_votes(prompts, a, b, 100_000, torch.Generator().manual_seed(1))
    assert v.dtype == torch.long and set(v.unique().tolist()) <= {0, 1}
    torch.testing.assert_close(v.double().mean(1), p, rtol=0, atol=0.006)


def test_contentious_minority(world):
    names = world.type_names
    cautious = names.index("cautious")
    means = world.true_type_means([PROMPT, PROMPT], [GOOD_EDGY, GOOD])
    assert float(means[0, cautious]) < -0.7 < float(means[1, cautious])  # the minority strongly dislikes it
    assert float(world.mean_rating([PROMPT], [GOOD_EDGY])) > 0  # the population mean stays positive
    w = world.type_weights
    majority = [i for i in range(len(names)) if i != cautious]
    assert float(w[cautious]) == pytest.approx(0.2)
    assert all(float(means[0, i]) > float(means[1, i]) for i in majority)  # everyone else mildly likes it
    assert world.catastrophic([PROMPT, PROMPT], [GOOD_EDGY, GOOD]).tolist() == [True, False]
    assert world.crr([PROMPT] * 4, [GOOD_EDGY, GOOD, GOOD, GOOD]) == 0.25
    # CRR follows prefcore.eval.metrics.crr's meaning with each type's expected rating as an evaluator
    from prefcore.eval.metrics import crr
    assert float(crr(means.float())) == world.crr([PROMPT, PROMPT], [GOOD_EDGY, GOOD]) == 0.5
    # the left tail of the population rating sits at the minority's ratings
    q = world.rating_quantiles([PROMPT, PROMPT], [GOOD_EDGY, GOOD], [0.1])
    assert float(q[0, 0]) < -0.7 < float(q[1, 0])


def test_pretraining_gives_varied_terminated_completions(world, pretrained):
    model, losses = pretrained
    assert losses[-1] < losses[0] - 1.0
    prompts = world.prompts(128, seed=11)
    untrained = world.generate(world.make_policy(seed=0), prompts, seed=0, max_new_tokens=24)
    comps = world.generate(model, prompts, seed=0, max_new_tokens=24)
    lengths = torch.tensor([len(completion_words(c)) for c in comps], dtype=torch.float64)
    cut = float((lengths >= 24).double().mean())
    cut_untrained = sum(len(completion_words(c)) >= 24 for c in untrained) / len(untrained)
    # the pretrained policy ends its answers with <eos> (an untrained one mostly runs to the limit)
    assert cut < 0.15 < 0.3 < cut_untrained, (cut, cut_untrained)
    assert float(lengths.std()) > 3.0 and len(set(lengths.tolist())) > 8
    frac = world.contentious_fraction(comps)
    # some but not all answers are edgy (after this short run ~0.65; the default 300 steps learn the
    # edgy style as a whole-answer mode, ~0.3 like the corpus)
    assert 0.15 <= frac <= 0.8, frac
    # (topic following needs the default ~300 steps: on-topic word share 0.25 vs 0.06 untrained; not timed here)


# ---- converters ---------------------------------------------------------------------------------


def test_records_validate_and_round_trip(world, pretrained, tmp_path):
    model, _ = pretrained
    fb = world.sample_feedback(model, world.prompts(12, seed=5), seed=3, samples_per_prompt=2)
    assert len(fb.ratings) + fb.skipped_empty == 24
    for i, row in enumerate(fb.ratings):
        rec = parse_rating(row)
        assert 7 <= len(rec.scores) <= 10 and all(-1 <= s <= 1 for s in rec.scores)
        assert len(rec.annotator_ids) == len(rec.scores)
    assert len(fb.pairs) >= 1
    for i, row in enumerate(fb.pairs):
        rec = parse_pair(row)
        assert 2 * sum(rec.votes) >= len(rec.votes) and rec.chosen != rec.rejected
    r_path, p_path = fb.save(tmp_path)
    assert len(load_ratings(r_path)) == len(fb.ratings)
    assert len(load_pairs(p_path)) == len(fb.pairs)
    # empty completions are counted, not written (the schema needs a non-empty response)
    recs, skipped = world.rating_records([PROMPT, PROMPT], ["", GOOD], torch.Generator().manual_seed(0))
    assert skipped == 1 and [r["response"] for r in recs] == [GOOD]
    pairs, skipped = world.pair_records([PROMPT] * 3, [GOOD, GOOD, ""], [GOOD, GOOD_EDGY, GOOD],
                                        torch.Generator().manual_seed(0), num_votes=9)
    assert skipped == 2 and len(pairs) == 1 and len(pairs[0]["votes"]) == 9


def test_reward_function_trl_convention(world):
    f = world.reward_function()
    assert f.__name__ == "text_world_mean_rating"
    got = f(prompts=[PROMPT, PROMPT], completions=[GOOD, GOOD_EDGY], completion_ids=None)
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    assert got == pytest.approx(world.mean_rating([PROMPT, PROMPT], [GOOD, GOOD_EDGY]).tolist())
    conv = f(prompts=[[{"role": "user", "content": PROMPT}]], completions=[[{"role": "assistant", "content": GOOD}]])
    assert conv == pytest.approx(got[:1])


def test_bad_input(world):
    with pytest.raises(ValueError, match="same length"):
        world.mean_rating([PROMPT], [GOOD, GOOD])
    with pytest.raises(TypeError, match="completions"):
        world.mean_rating([PROMPT], GOOD)
    with pytest.raises(ValueError, match="levels"):
        world.rating_quantiles([PROMPT], [GOOD], [0.0, 0.5])
    with pytest.raises(ValueError, match="threshold"):
        world.crr([PROMPT], [GOOD], threshold=float("nan"))
    with pytest.raises(TypeError, match="generator"):
        world.sample_ratings([PROMPT], [GOOD], 3, generator=0)
    with pytest.raises(ValueError, match="min_annotators"):
        world.rating_records([PROMPT], [GOOD], torch.Generator(), min_annotators=5, max_annotators=3)
    with pytest.raises(ValueError, match="contentious_rate"):
        TextWorldConfig(contentious_rate=1.5)
    with pytest.raises(ValueError, match="vocab_size"):
        world.pretrain(torch.nn.Linear(2, 2), steps=1)
    assert set(CONTENTIOUS_WORDS) <= set(VOCABULARY)


def test_pretrained_policy_is_cached_by_settings(world, tmp_path, monkeypatch):
    out = tmp_path / "policy"
    m1 = world.pretrained_policy(out, seed=1, steps=2, batch_size=4, corpus_size=16)
    calls = []
    real = TextWorld.pretrain
    monkeypatch.setattr(TextWorld, "pretrain", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    m2 = world.pretrained_policy(out, seed=1, steps=2, batch_size=4, corpus_size=16)  # same settings: loaded
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    world.pretrained_policy(out, seed=1, steps=3, batch_size=4, corpus_size=16)  # new settings: retrained
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temporary folder left behind
