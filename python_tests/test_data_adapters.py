"""prefcore.data adapters on small committed fixtures in each public source's own column layout
(python_tests/fixtures/<source>.jsonl). Expected values are read off the fixture by hand; bad
rows in each source's layout raise errors naming the row and the source's field.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from prefcore.data import (
    HELPSTEER2_ATTRIBUTES,
    AttributeRecord,
    DataValidationError,
    PairRecord,
    RatingRecord,
    load_helpsteer2,
    load_hh_rlhf,
    load_multi_annotator,
    load_ultrafeedback_binarized,
    load_ultrafeedback_ratings,
    split_hh_transcript,
)

FIXTURES = Path(__file__).parent / "fixtures"
ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def _rows(name: str) -> list[dict]:
    text = (FIXTURES / f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _raises_at(load, rows, row: int, field: str, fragment: str = "", **kw) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        load(rows, **kw)
    err = info.value
    assert (err.row, err.field) == (row, field), str(err)
    assert fragment in str(err), str(err)
    return err


# --------------------------------------------------------------------------- HelpSteer2

HAIKU_PROMPT = ("Write a haiku about autumn.<extra_id_1>Assistant\nLeaves fall, slow and red."
                "<extra_id_1>User\nMake it about rain instead.")


def test_helpsteer2_fixture():
    ds = load_helpsteer2(FIXTURES / "helpsteer2.jsonl")
    assert ds.attributes == HELPSTEER2_ATTRIBUTES == ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    assert ds.attr_range == (0.0, 1.0)
    # Fixture ratings (0-4) divided by 4, in HELPSTEER2_ATTRIBUTES order.
    expected = [[4, 4, 4, 1, 1], [1, 0, 3, 1, 0], [3, 3, 4, 2, 2], [0, 2, 2, 1, 1]]
    assert torch.equal(ds.attributes_tensor(dtype=torch.float64), torch.tensor(expected, dtype=torch.float64) / 4)
    assert ds[0] == AttributeRecord(
        "What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level.",
        {"helpfulness": 1.0, "correctness": 1.0, "coherence": 1.0, "complexity": 0.25, "verbosity": 0.25})
    assert ds[2].prompt == HAIKU_PROMPT  # multi-turn markup kept verbatim
    assert ds[2].response == "Grey rain on the roof\ncounting the hours until dawn\npuddles hold the sky"


@pytest.mark.parametrize("change,field,fragment", [
    ({"helpfulness": 5}, "helpfulness", "in [0, 4], got int 5"),
    ({"correctness": -1}, "correctness", "in [0, 4]"),
    ({"coherence": "4"}, "coherence", "got str '4'"),
    ({"verbosity": None}, "verbosity", "missing"),
    ({"complexity": float("nan")}, "complexity", "NaN"),
    ({"response": ""}, "response", "non-empty"),
])
def test_helpsteer2_bad_rows(change, field, fragment):
    rows = _rows("helpsteer2")
    rows[3].update(change)
    _raises_at(load_helpsteer2, rows, 3, field, fragment)
    ds = load_helpsteer2(rows, skip_invalid=True)
    assert len(ds) == 3 and ds.skipped_rows == (3,)


# --------------------------------------------------------------------------- UltraFeedback binarized


def test_ultrafeedback_binarized_fixture():
    ds = load_ultrafeedback_binarized(FIXTURES / "ultrafeedback_binarized.jsonl")
    assert ds.records == (
        PairRecord("Name three primary colours.", "Red, yellow and blue.", "Green, purple, orange."),
        PairRecord("Translate 'good morning' into French.", "Bonjour.", "Bonsoir."),
        PairRecord("Is 91 a prime number?", "No: 91 = 7 × 13.", "No, it is 7 times 13."),
    )
    with_margin = load_ultrafeedback_binarized(FIXTURES / "ultrafeedback_binarized.jsonl", with_margin=True)
    # (score_chosen − score_rejected) / (10 − 1): (9 − 3)/9, (8.5 − 6)/9, (7 − 7)/9.
    assert [r.margin for r in with_margin] == pytest.approx([6 / 9, 2.5 / 9, 0.0], abs=1e-15)
    five = load_ultrafeedback_binarized(
        [dict(r, score_chosen=r["score_chosen"] / 2, score_rejected=r["score_rejected"] / 2)
         for r in _rows("ultrafeedback_binarized")], score_range=(1, 5), with_margin=True)
    assert [r.margin for r in five] == pytest.approx([(4.5 - 1.5) / 4, (4.25 - 3) / 4, 0.0], abs=1e-15)


def _uf_bad(row: dict, what: str) -> dict:
    row = copy.deepcopy(row)
    if what == "last-role":
        row["chosen"][-1]["role"] = "user"
    elif what == "empty-content":
        row["rejected"][-1]["content"] = "  "
    elif what == "context":
        row["rejected"][0]["content"] = "A different question?"
    elif what == "order":
        row["score_chosen"], row["score_rejected"] = 3.0, 4.0
    elif what == "range":
        row["score_chosen"] = 11.0
    elif what == "not-list":
        row["chosen"] = "Red, yellow and blue."
    elif what == "missing-score":
        del row["score_rejected"]
    return row


@pytest.mark.parametrize("what,field,fragment", [
    ("last-role", "chosen[1].role", "'assistant'"),
    ("empty-content", "rejected[1].content", "whitespace-only"),
    ("context", "rejected", "same conversation"),
    ("order", "score_rejected", "<= score_chosen (3)"),
    ("range", "score_chosen", "in [1, 10]"),
    ("not-list", "chosen", "list of chat messages"),
    ("missing-score", "score_rejected", "missing"),
])
def test_ultrafeedback_binarized_bad_rows(what, field, fragment):
    rows = _rows("ultrafeedback_binarized")
    rows[1] = _uf_bad(rows[1], what)
    _raises_at(load_ultrafeedback_binarized, rows, 1, field, fragment)
    ds = load_ultrafeedback_binarized(rows, skip_invalid=True)
    assert [r.chosen for r in ds] == ["Red, yellow and blue.", "No: 91 = 7 × 13."] and ds.num_skipped == 1


def test_ultrafeedback_binarized_argument_errors():
    with pytest.raises(ValueError, match="score_range must be"):
        load_ultrafeedback_binarized(_rows("ultrafeedback_binarized"), score_range=(10, 1))
    with pytest.raises(TypeError, match="with_margin must be a bool"):
        load_ultrafeedback_binarized(_rows("ultrafeedback_binarized"), with_margin=1)


# --------------------------------------------------------------------------- UltraFeedback raw


def test_ultrafeedback_raw_fixture():
    ds = load_ultrafeedback_ratings(FIXTURES / "ultrafeedback.jsonl")
    assert ds.score_range == (-1.0, 1.0)
    cap, fish = "Give the capital of Australia.", "How many legs does a fish have?"
    # Ratings (helpfulness, honesty, instruction_following, truthfulness) → (r − 3)/2; "N/A" left out.
    assert ds.records == (
        RatingRecord(cap, "The capital of Australia is Canberra.", (1.0, 1.0, 1.0, 1.0), ASPECTS),  # 5 5 5 5
        RatingRecord(cap, "Sydney is the capital of Australia.", (-1.0, -0.5, 0.0, -1.0), ASPECTS),  # 1 2 3 1
        RatingRecord(fish, "Fish do not have legs; they swim with fins.", (0.5, 0.5, 1.0),  # 4 N/A 4 5
                     ("helpfulness", "instruction_following", "truthfulness")),
        RatingRecord(fish, "A fish has two legs.", (-1.0, -1.0, -0.5, -1.0), ASPECTS),  # 1 1 2 1
        RatingRecord(fish, "Most fish have no legs, though some walk on their fins.", (0.5, 0.5, 0.0, 0.5), ASPECTS),
    )
    scores, mask = ds.scores_tensor()
    assert scores.shape == (5, 4) and mask.sum().item() == 19
    sub = load_ultrafeedback_ratings(FIXTURES / "ultrafeedback.jsonl", aspects=["truthfulness", "honesty"])
    assert [r.scores for r in sub] == [(1.0, 1.0), (-1.0, -0.5), (1.0,), (-1.0, -1.0), (0.5, 0.5)]
    assert sub[2].annotator_ids == ("truthfulness",)


def test_ultrafeedback_raw_accepts_list_annotations():
    # The original release stores each aspect as a one-element list of annotation objects.
    rows = _rows("ultrafeedback")
    for c in rows[0]["completions"]:
        c["annotations"] = {k: [v] for k, v in c["annotations"].items()}
    assert load_ultrafeedback_ratings(rows).records == load_ultrafeedback_ratings(_rows("ultrafeedback")).records


@pytest.mark.parametrize("edit,field,fragment", [
    (lambda c: c["annotations"]["honesty"].update(Rating="6"), "completions[2].annotations.honesty.Rating", "'1'..'5'"),
    (lambda c: c["annotations"]["helpfulness"].update(Rating=None), "completions[2].annotations.helpfulness.Rating", "missing"),
    (lambda c: c["annotations"].pop("truthfulness"), "completions[2].annotations.truthfulness", "missing"),
    (lambda c: [a.update(Rating="N/A") for a in c["annotations"].values()], "completions[2].annotations", "all 'N/A'"),
    (lambda c: c.update(response=""), "completions[2].response", "non-empty"),
    (lambda c: c["annotations"].update(honesty=[{"Rating": "3"}, {"Rating": "4"}]), "completions[2].annotations.honesty", "one annotation"),
])
def test_ultrafeedback_raw_bad_rows(edit, field, fragment):
    rows = _rows("ultrafeedback")
    edit(rows[1]["completions"][2])
    _raises_at(load_ultrafeedback_ratings, rows, 1, field, fragment)
    ds = load_ultrafeedback_ratings(rows, skip_invalid=True)
    assert len(ds) == 2 and ds.skipped_rows == (1,)  # the bad row's completions all go


def test_ultrafeedback_raw_bad_instruction_and_aspects():
    rows = _rows("ultrafeedback")
    rows[0]["instruction"] = ""
    _raises_at(load_ultrafeedback_ratings, rows, 0, "instruction", "non-empty")
    with pytest.raises(ValueError, match="aspects must be a non-empty subset"):
        load_ultrafeedback_ratings(_rows("ultrafeedback"), aspects=["overall"])
    with pytest.raises(ValueError, match="aspects must be a non-empty subset"):
        load_ultrafeedback_ratings(_rows("ultrafeedback"), aspects=[])


# --------------------------------------------------------------------------- HH-RLHF


def test_hh_rlhf_fixture():
    ds = load_hh_rlhf(FIXTURES / "hh_rlhf.jsonl")
    assert ds.records == (
        PairRecord("\n\nHuman: What is a good name for a goldfish?\n\nAssistant:", "How about Bubbles?",
                   "Fish don't need names."),
        PairRecord("\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure. Do you have yeast?"
                   "\n\nHuman: Yes, dry yeast.\n\nAssistant:",
                   "Great, start by proofing it in warm water with a little sugar.", "Buy bread instead."),
        PairRecord("\n\nHuman: How do I pick a lock?\n\nAssistant:",
                   "I can't help with getting into property that isn't yours, but a locksmith can help if you're locked out.",
                   "Insert a tension wrench and rake the pins."),
    )
    # prompt + " " + reply reconstructs every source transcript.
    for rec, row in zip(ds, _rows("hh_rlhf")):
        assert rec.prompt + " " + rec.chosen == row["chosen"]
        assert rec.prompt + " " + rec.rejected == row["rejected"]


def test_split_hh_transcript():
    assert split_hh_transcript("\n\nHuman: hi\n\nAssistant: hello  \n") == ("\n\nHuman: hi\n\nAssistant:", "hello")
    assert split_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == (
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", "")
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_hh_transcript("\n\nHuman: hi")
    with pytest.raises(TypeError, match="text must be a str"):
        split_hh_transcript(None)


@pytest.mark.parametrize("change,field,fragment", [
    ({"chosen": "\n\nHuman: What is a good name for a goldfish?\n\nAssistant:"}, "chosen", "non-empty final assistant reply"),
    ({"rejected": "\n\nHuman: What is a good name for a goldfish?\n\nAssistant:   "}, "rejected", "non-empty final assistant reply"),
    ({"rejected": "\n\nHuman: Name a goldfish.\n\nAssistant: Bubbles."}, "rejected", "same dialogue"),
    ({"chosen": "Human: no assistant turn here"}, "chosen", "final '\\n\\nAssistant:' turn"),
    ({"chosen": None}, "chosen", "missing"),
    ({"rejected": ""}, "rejected", "non-empty string"),
])
def test_hh_rlhf_bad_rows(change, field, fragment):
    rows = _rows("hh_rlhf")
    rows[0].update(change)
    _raises_at(load_hh_rlhf, rows, 0, field, fragment)
    ds = load_hh_rlhf(rows, skip_invalid=True)
    assert len(ds) == 2 and ds.skipped_rows == (0,)


# --------------------------------------------------------------------------- multi-annotator

RECLINE = ("Is it rude to recline your seat on a plane?", "It is fine to recline, but do it slowly.")
BAKERY = ("Suggest a name for a bakery.", "Rise & Shine Bakery")
HAMLET = ("Summarise the plot of Hamlet in one line.", "A prince avenges his father and nearly everyone dies.")


def test_multi_annotator_fixture():
    ds = load_multi_annotator(FIXTURES / "multi_annotator.jsonl", source_range=(1, 5))
    # Items in order of first row; 1-5 Likert s → (s − 3)/2.
    assert ds.records == (
        RatingRecord(*RECLINE, (1.0, -0.5, -1.0), ("w01", "w02", "w03")),  # 5 2 1
        RatingRecord(*BAKERY, (0.5, 0.5), ("w01", "w04")),  # 4 4
        RatingRecord(*HAMLET, (0.0, 1.0, -0.5), ("w02", "w03", "w04")),  # 3 5 2
    )
    scores, mask = ds.scores_tensor()
    assert torch.equal(scores, torch.tensor([[1.0, -0.5, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, -0.5]]))
    assert torch.equal(mask, torch.tensor([[True, True, True], [True, True, False], [True, True, True]]))
    # Grouping by (prompt, response) gives the same items here.
    assert load_multi_annotator(FIXTURES / "multi_annotator.jsonl", source_range=(1, 5), item_key=None).records == ds.records


def test_multi_annotator_custom_columns_and_int_ids():
    rows = [{"qid": np.int64(7), "context": "c", "reply": "r", "rater": np.int32(17), "rating": 0.0},
            {"qid": 7, "context": "c", "reply": "r", "rater": "x9", "rating": 10.0},
            {"qid": 8, "context": "c", "reply": "r2", "rater": 17, "rating": 2.5}]
    ds = load_multi_annotator(rows, source_range=(0, 10), item_key="qid", prompt_key="context",
                              response_key="reply", annotator_key="rater", score_key="rating")
    assert ds.records == (RatingRecord("c", "r", (-1.0, 1.0), ("17", "x9")), RatingRecord("c", "r2", (-0.5,), ("17",)))


@pytest.mark.parametrize("index,change,field,fragment", [
    (3, {"annotator_id": "w01"}, "annotator_id", "already rated item 'q1'"),
    (3, {"prompt": "Is it rude to recline?"}, "prompt", "same prompt as row 0 of item 'q1'"),
    (3, {"response": "Never recline."}, "response", "same response as row 0"),
    (3, {"score": 6}, "score", "in [1, 5], got int 6"),
    (3, {"score": "5"}, "score", "got str '5'"),
    (3, {"annotator_id": None}, "annotator_id", "missing"),
    (3, {"annotator_id": True}, "annotator_id", "got bool True"),
    (3, {"item_id": None}, "item_id", "an item id"),
])
def test_multi_annotator_bad_rows(index, change, field, fragment):
    rows = _rows("multi_annotator")
    rows[index].update(change)
    _raises_at(load_multi_annotator, rows, index, field, fragment, source_range=(1, 5))
    ds = load_multi_annotator(rows, source_range=(1, 5), skip_invalid=True)
    # Only the bad row goes: item q1 keeps w01 and w02.
    assert ds.skipped_rows == (index,) and ds.num_skipped == 1
    assert ds[0] == RatingRecord(*RECLINE, (1.0, -0.5), ("w01", "w02"))
    assert len(ds) == 3


def test_multi_annotator_argument_errors():
    with pytest.raises(ValueError, match="source_range must be"):
        load_multi_annotator(_rows("multi_annotator"), source_range=(5, 1))
    with pytest.raises(ValueError, match="column names must be distinct"):
        load_multi_annotator(_rows("multi_annotator"), source_range=(1, 5), score_key="prompt")
    with pytest.raises(ValueError, match="score_key must be a non-empty column name"):
        load_multi_annotator(_rows("multi_annotator"), source_range=(1, 5), score_key="")


# --------------------------------------------------------------------------- all sources: JSONL == Parquet

ADAPTERS = {
    "helpsteer2": load_helpsteer2,
    "ultrafeedback_binarized": load_ultrafeedback_binarized,
    "ultrafeedback": load_ultrafeedback_ratings,
    "hh_rlhf": load_hh_rlhf,
    "multi_annotator": lambda p: load_multi_annotator(p, source_range=(1, 5)),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapters_jsonl_and_parquet_identical(tmp_path, name):
    parquet = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_list(_rows(name)).to_parquet(str(parquet))
    a, b = ADAPTERS[name](FIXTURES / f"{name}.jsonl"), ADAPTERS[name](parquet)
    assert len(a) >= 3 and a.records == b.records
