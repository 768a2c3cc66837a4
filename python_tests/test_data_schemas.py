"""prefcore.data schemas: every kind of bad row raises DataValidationError naming the source,
row and field; skip_invalid skips and counts; records validate their own structure.

Every bad row sits at index 1 between two valid rows, so a wrong row index is caught too.
"""
from __future__ import annotations

import json
import math
import pickle

import numpy as np

import pytest
import torch

from prefcore.data import (
    AttributeRecord,
    DataValidationError,
    PairRecord,
    RatingRecord,
    load_attributes,
    load_pairs,
    load_ratings,
)

RATING = {"prompt": "p", "response": "r", "scores": [0.5, -0.5], "annotator_ids": ["a", "b"]}
PAIR = {"prompt": "p", "chosen": "c", "rejected": "x", "votes": [1, 0, 1], "margin": 0.25}
ATTR = {"prompt": "p", "response": "r", "helpfulness": 0.5, "safety": 1.0}
ATTRS = ("helpfulness", "safety")


def _with(base: dict, **changes) -> dict:
    row = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            row.pop(k)
        else:
            row[k] = v
    return row


_DROP = object()

# (bad row, field named in the error, a fragment of "expected ..." / "got ...")
BAD_RATINGS = [
    (_with(RATING, prompt=_DROP), "prompt", "missing"),
    (_with(RATING, prompt=None), "prompt", "missing"),
    (_with(RATING, response=""), "response", "non-empty string"),
    (_with(RATING, response=" \n\t"), "response", "whitespace-only"),
    (_with(RATING, prompt=3), "prompt", "got int 3"),
    (_with(RATING, scores=[0.5, 1.5]), "scores[1]", "in [-1, 1]"),
    (_with(RATING, scores=[-1.01, 0.0]), "scores[0]", "in [-1, 1]"),
    (_with(RATING, scores=["0.5", 0.0]), "scores[0]", "got str '0.5'"),
    (_with(RATING, scores=[True, 0.0]), "scores[0]", "got bool True"),
    (_with(RATING, scores=[0.0, float("nan")]), "scores[1]", "NaN"),
    (_with(RATING, scores=[float("inf"), 0.0]), "scores[0]", "infinite"),
    (_with(RATING, scores=[]), "scores", "non-empty list"),
    (_with(RATING, scores=0.5), "scores", "non-empty list"),
    (_with(RATING, scores=_DROP), "scores", "missing"),
    (_with(RATING, annotator_ids=["a"]), "annotator_ids", "one id per score"),
    (_with(RATING, annotator_ids=["a", "b", "c"]), "annotator_ids", "one id per score"),
    (_with(RATING, annotator_ids=["a", "a"]), "annotator_ids[1]", "unique"),
    (_with(RATING, annotator_ids=["a", ""]), "annotator_ids[1]", "non-empty string"),
    (_with(RATING, annotator_ids=["a", 7]), "annotator_ids[1]", "got int 7"),
    ("not a row", "<row>", "an object"),
]

BAD_PAIRS = [
    (_with(PAIR, chosen=_DROP), "chosen", "missing"),
    (_with(PAIR, rejected=""), "rejected", "non-empty string"),
    (_with(PAIR, prompt="   "), "prompt", "whitespace-only"),
    (_with(PAIR, votes=[1, 2]), "votes[1]", "0 or 1"),
    (_with(PAIR, votes=[-1]), "votes[0]", "0 or 1"),
    (_with(PAIR, votes=[True, 0]), "votes[0]", "got bool True"),
    (_with(PAIR, votes=[1.0, 0]), "votes[0]", "got float 1.0"),
    (_with(PAIR, votes=["1"]), "votes[0]", "got str '1'"),
    (_with(PAIR, votes=[]), "votes", "non-empty list"),
    (_with(PAIR, votes=1), "votes", "non-empty list"),
    (_with(PAIR, margin="big"), "margin", "finite number"),
    (_with(PAIR, margin=float("nan")), "margin", "NaN"),
    (_with(PAIR, margin=-0.1), "margin", ">= 0"),
]

BAD_ATTRS = [
    (_with(ATTR, safety=_DROP), "safety", "missing"),
    (_with(ATTR, helpfulness=1.2), "helpfulness", "in [0, 1]"),
    (_with(ATTR, helpfulness=-0.5), "helpfulness", "in [0, 1]"),
    (_with(ATTR, helpfulness="0.5"), "helpfulness", "got str"),
    (_with(ATTR, safety=float("nan")), "safety", "NaN"),
    (_with(ATTR, response=_DROP), "response", "missing"),
]

LOADERS = {
    "ratings": (lambda rows, **kw: load_ratings(rows, **kw), RATING, BAD_RATINGS),
    "pairs": (lambda rows, **kw: load_pairs(rows, **kw), PAIR, BAD_PAIRS),
    "attributes": (lambda rows, **kw: load_attributes(rows, attributes=ATTRS, **kw), ATTR, BAD_ATTRS),
}
CASES = [(kind, bad, field, frag) for kind, (_, _, table) in LOADERS.items() for bad, field, frag in table]


def _ids(case):
    kind, _, field, frag = case
    return f"{kind}-{field}-{frag}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_row_raises_naming_source_row_and_field(case):
    kind, bad, field, frag = case
    load, good, _ = LOADERS[kind]
    with pytest.raises(DataValidationError) as info:
        load([good, bad, good])
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.source, err.row, err.field) == ("<records>", 1, field)
    msg = str(err)
    assert msg.startswith(f"<records>, row 1, field '{field}': expected ")
    assert frag in msg, msg


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_skip_invalid_skips_and_counts(case, caplog):
    kind, bad, field, _ = case
    load, good, _ = LOADERS[kind]
    ds = load([good, bad, good, bad, good], skip_invalid=True)
    assert len(ds) == 3
    assert ds.num_skipped == 2 and ds.skipped_rows == (1, 3)
    assert len(ds.skipped_errors) == 2 and f"row 1, field '{field}'" in ds.skipped_errors[0]
    assert "skipped 2 invalid row(s) of 5" in caplog.text


def test_skip_invalid_keeps_only_first_messages_but_all_indices():
    rows = [RATING if i % 2 == 0 else _with(RATING, scores=[2.0]) for i in range(30)]
    ds = load_ratings(rows, skip_invalid=True)
    assert len(ds) == 15 and ds.num_skipped == 15
    assert ds.skipped_rows == tuple(range(1, 30, 2))
    assert len(ds.skipped_errors) == 5


def test_valid_rows_convert_exactly():
    ds = load_ratings([RATING, {"prompt": "q", "response": "s", "scores": [1, -1, 0]}])
    assert ds.records == (
        RatingRecord("p", "r", (0.5, -0.5), ("a", "b")),
        RatingRecord("q", "s", (1.0, -1.0, 0.0), None),
    )
    assert all(type(s) is float for s in ds[1].scores)  # ints are stored as floats
    pairs = load_pairs([PAIR, {"prompt": "p", "chosen": "c", "rejected": "x"}])
    assert pairs.records == (PairRecord("p", "c", "x", (1, 0, 1), 0.25), PairRecord("p", "c", "x"))
    attrs = load_attributes([_with(ATTR, extra="ignored")], attributes=ATTRS)
    assert attrs.records == (AttributeRecord("p", "r", {"helpfulness": 0.5, "safety": 1.0}),)


def test_declared_ranges_are_used_and_inclusive():
    rows = [_with(RATING, scores=[1.0, 5.0])]
    ds = load_ratings(rows, score_range=(1, 5))
    assert ds.score_range == (1.0, 5.0) and ds[0].scores == (1.0, 5.0)
    with pytest.raises(DataValidationError, match=r"field 'scores\[1\]': expected a number in \[1, 5\], got float 5.5"):
        load_ratings([_with(RATING, scores=[1.0, 5.5])], score_range=(1, 5))
    ok = load_attributes([_with(ATTR, helpfulness=4, safety=0)], attributes=ATTRS, attr_range=(0, 4))
    assert ok[0].attributes == {"helpfulness": 4.0, "safety": 0.0}
    with pytest.raises(DataValidationError, match=r"field 'safety'"):
        load_attributes([_with(ATTR, safety=-1)], attributes=ATTRS, attr_range=(0, 4))


@pytest.mark.parametrize("bad", [(1, 1), (2, 1), (0, float("nan")), (0,), "ab", (0, True), None])
def test_bad_range_arguments(bad):
    with pytest.raises(ValueError, match="score_range must be a"):
        load_ratings([RATING], score_range=bad)
    with pytest.raises(ValueError, match="attr_range must be a"):
        load_attributes([ATTR], attributes=ATTRS, attr_range=bad)


@pytest.mark.parametrize("bad", [[], "helpfulness", ["a", "a"], ["prompt"], [""], [3]])
def test_bad_attribute_names(bad):
    with pytest.raises(ValueError, match="attributes must"):
        load_attributes([ATTR], attributes=bad)


def test_skip_invalid_must_be_bool():
    with pytest.raises(TypeError, match="skip_invalid must be a bool"):
        load_ratings([RATING], skip_invalid="yes")


def test_records_validate_their_own_structure():
    with pytest.raises(DataValidationError, match=r"^RatingRecord, field 'scores\[0\]'.*NaN"):
        RatingRecord("p", "r", (float("nan"),))
    with pytest.raises(DataValidationError, match=r"^RatingRecord, field 'annotator_ids'"):
        RatingRecord("p", "r", (0.1, 0.2), ("a",))
    with pytest.raises(DataValidationError, match=r"^PairRecord, field 'votes\[0\]'"):
        PairRecord("p", "c", "x", (2,))
    with pytest.raises(DataValidationError, match=r"^PairRecord, field 'margin'"):
        PairRecord("p", "c", "x", None, -1.0)
    with pytest.raises(DataValidationError, match=r"^AttributeRecord, field 'prompt'"):
        AttributeRecord("", "r", {"a": 0.1})
    with pytest.raises(DataValidationError, match=r"^AttributeRecord, field 'attributes'"):
        AttributeRecord("p", "r", {})
    # Outside a declared range is fine for a bare record: the range belongs to the loader.
    assert RatingRecord("p", "r", [3, 4]).scores == (3.0, 4.0)
    rec = RatingRecord("p", "r", [0.1], ["a"])
    assert rec.annotator_ids == ("a",) and isinstance(rec.scores, tuple)
    with pytest.raises(AttributeError):
        rec.prompt = "q"  # frozen


def test_vote_margin_matches_eq3():
    # m = |Σ j − n/2| / (n/2): 3 of 4 → |3 − 2|/2 = 0.5; unanimous → 1; split → 0.
    assert PairRecord("p", "c", "x", (1, 1, 0, 1)).vote_margin() == 0.5
    assert PairRecord("p", "c", "x", (1, 1, 1)).vote_margin() == 1.0
    assert PairRecord("p", "c", "x", (0, 0, 0)).vote_margin() == 1.0
    assert PairRecord("p", "c", "x", (0, 1)).vote_margin() == 0.0
    assert math.isclose(PairRecord("p", "c", "x", (1, 0, 0)).vote_margin(), 1 / 3)
    assert PairRecord("p", "c", "x").vote_margin() is None


def test_error_pickles_with_fields():
    err = DataValidationError("f.jsonl", 3, "scores[0]", "a number", "str 'x'")
    back = pickle.loads(pickle.dumps(err))
    assert (back.source, back.row, back.field, str(back)) == ("f.jsonl", 3, "scores[0]", str(err))


def test_long_values_are_truncated_in_messages():
    with pytest.raises(DataValidationError) as info:
        load_ratings([_with(RATING, scores="x" * 1000)])
    msg = str(info.value)
    assert len(msg) < 250 and msg.endswith("...") and "x" * 60 in msg


def test_bad_rows_in_a_file_name_the_file(tmp_path):
    # A string score among numbers: Arrow keeps the raw value (Json column), so the validator
    # sees it and names the file, the row and the field.
    path = tmp_path / "ratings.jsonl"
    rows = [RATING, RATING, _with(RATING, scores=[0.1, "high"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataValidationError) as info:
        load_ratings(path)
    assert (info.value.source, info.value.row, info.value.field) == (str(path), 2, "scores[1]")
    assert str(info.value).startswith(f"{path}, row 2, field 'scores[1]'")
    ds = load_ratings(str(path), skip_invalid=True)
    assert len(ds) == 2 and ds.skipped_rows == (2,) and ds.source == str(path)


def test_nan_in_a_jsonl_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(_with(PAIR, margin=float("nan"))) + "\n")
    assert "NaN" in path.read_text()  # Python's json writes the non-standard token
    with pytest.raises(DataValidationError, match=r"row 1, field 'margin'.*NaN"):
        load_pairs(path)


def test_scores_tensor_from_validated_records():
    ds = load_ratings([RATING, _with(RATING, scores=[1.0], annotator_ids=None)])
    scores, mask = ds.scores_tensor(dtype=torch.float64)
    assert scores.dtype == torch.float64 and mask.dtype == torch.bool
    assert torch.equal(scores, torch.tensor([[0.5, -0.5], [1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(mask, torch.tensor([[True, True], [True, False]]))


def test_numpy_scalars_are_numbers_but_numpy_bools_are_not():
    ds = load_ratings([_with(RATING, scores=[np.float32(0.5), np.int64(-1)])])
    assert ds[0].scores == (0.5, -1.0) and all(type(s) is float for s in ds[0].scores)
    assert load_pairs([_with(PAIR, votes=[np.int64(1), np.int8(0)])])[0].votes == (1, 0)
    with pytest.raises(DataValidationError, match=r"field 'scores\[0\]'.*got bool"):
        load_ratings([_with(RATING, scores=[np.bool_(True), 0.0])])
    with pytest.raises(DataValidationError, match=r"field 'votes\[0\]'"):
        load_pairs([_with(PAIR, votes=[np.bool_(True)])])
