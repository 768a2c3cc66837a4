"""prefcore.data loading and writing: the committed fixtures of prefcore's own schemas load
exactly as written, JSONL and Parquet give identical records, save_jsonl round-trips atomically,
tensor views, and loading writes nothing outside a temporary directory it removes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
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
    read_rows,
    save_jsonl,
)

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent

# What python_tests/fixtures/{ratings,pairs,attributes}.jsonl hold, written out by hand.
RATINGS = (
    RatingRecord("Tell me a joke.", "Why did the chicken cross the road?", (0.5, -0.25, 1.0), ("a1", "a2", "a3")),
    RatingRecord("Tell me a joke.", "No.", (-1.0, -0.75), None),
    RatingRecord("Explain gravity briefly.", "Masses attract each other.", (0.0,), ("a2",)),
)
PAIRS = (
    PairRecord("Tell me a joke.", "Why did the chicken cross the road?", "No.", (1, 1, 0, 1), 0.5),
    PairRecord("Explain gravity briefly.", "Masses attract each other.", "Things fall.", None, None),
    PairRecord("Pick a colour.", "Blue.", "Red.", (0, 1), None),
)
ATTRIBUTES = (
    AttributeRecord("Tell me a joke.", "Why did the chicken cross the road?", {"helpfulness": 0.75, "safety": 1.0}),
    AttributeRecord("Explain gravity briefly.", "Masses attract each other.", {"helpfulness": 0.5, "safety": 0.0}),
)


def _json_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _to_parquet(rows: list[dict], path: Path) -> Path:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_fixtures_load_exactly():
    ratings = load_ratings(FIXTURES / "ratings.jsonl")
    assert ratings.records == RATINGS
    assert ratings.source == str(FIXTURES / "ratings.jsonl") and ratings.num_skipped == 0
    assert load_pairs(FIXTURES / "pairs.jsonl").records == PAIRS
    attrs = load_attributes(FIXTURES / "attributes.jsonl", attributes=["helpfulness", "safety"])
    assert attrs.records == ATTRIBUTES and attrs.attributes == ("helpfulness", "safety")


def test_jsonl_and_parquet_give_identical_records(tmp_path):
    for name, load in [("ratings", load_ratings), ("pairs", load_pairs),
                       ("attributes", lambda p: load_attributes(p, attributes=["helpfulness", "safety"]))]:
        jsonl = FIXTURES / f"{name}.jsonl"
        parquet = _to_parquet(_json_rows(jsonl), tmp_path / f"{name}.parquet")
        a, b = load(jsonl), load(parquet)
        assert a.records == b.records and len(a) > 0, name
        assert b.source == str(parquet)


def test_parquet_bad_row_names_row_and_field(tmp_path):
    rows = _json_rows(FIXTURES / "ratings.jsonl")
    rows[2]["scores"] = [0.0, float("nan")]
    path = _to_parquet(rows, tmp_path / "bad.parquet")
    with pytest.raises(DataValidationError) as info:
        load_ratings(path)
    assert (info.value.source, info.value.row, info.value.field) == (str(path), 2, "scores[1]")
    ds = load_ratings(path, skip_invalid=True)
    assert ds.records == RATINGS[:2] and ds.skipped_rows == (2,)


def test_records_from_an_in_memory_hf_dataset():
    rows = _json_rows(FIXTURES / "pairs.jsonl")
    assert load_pairs(datasets.Dataset.from_list(rows)).records == PAIRS


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "p"}) + "\n\n" + '{"prompt": "q", "response": \n')
    with pytest.raises(DataValidationError, match=r"broken\.jsonl, line 3, field '<json>': expected one JSON object per line"):
        load_ratings(path)


def test_empty_jsonl_gives_an_empty_collection(tmp_path):
    for text in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        ds = load_ratings(path)
        assert len(ds) == 0 and ds.num_skipped == 0 and ds.scores_tensor()[0].shape == (0, 0)


def test_read_rows_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_ratings(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match=r"must end in one of \('.jsonl', '.json', '.parquet'\)"):
        load_pairs(tmp_path / "data.csv")
    with pytest.raises(TypeError, match="path_or_records must be a file path or an iterable"):
        load_pairs({"prompt": "p", "chosen": "c", "rejected": "r"})
    with pytest.raises(TypeError, match="path_or_records must be a file path or an iterable"):
        load_pairs(42)
    assert read_rows([{"a": 1}]) == ("<records>", [{"a": 1}])


@pytest.mark.parametrize("records", [RATINGS, PAIRS, ATTRIBUTES], ids=["ratings", "pairs", "attributes"])
def test_save_jsonl_round_trips(tmp_path, records):
    path = tmp_path / "out.jsonl"
    assert save_jsonl(records, path) == len(records)
    if isinstance(records[0], RatingRecord):
        back = load_ratings(path)
    elif isinstance(records[0], PairRecord):
        back = load_pairs(path)
    else:
        back = load_attributes(path, attributes=["helpfulness", "safety"])
    assert back.records == records
    # Optional fields that are None are omitted, not written as null.
    assert "null" not in path.read_text()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_save_jsonl_writes_unicode_and_dicts(tmp_path):
    path = tmp_path / "u.jsonl"
    rec = RatingRecord("Bonjour ?", "Très bien — merci.", (0.25,))
    save_jsonl([rec, {"prompt": "x", "response": "y", "scores": [1]}], path)
    text = path.read_text(encoding="utf-8")
    assert "Très bien — merci." in text  # not \u-escaped
    assert load_ratings(path).records == (rec, RatingRecord("x", "y", (1.0,)))


def test_save_jsonl_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep.jsonl"
    save_jsonl(RATINGS, path)
    before = path.read_bytes()
    bad = [RATINGS[0], {"prompt": "p", "response": "r", "scores": [float("nan")]}]
    with pytest.raises(ValueError, match=r"records\[1\] is not strict JSON"):
        save_jsonl(bad, path)
    assert path.read_bytes() == before
    with pytest.raises(TypeError, match=r"records\[1\] must be a record or a mapping"):
        save_jsonl([RATINGS[0], 3], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.jsonl"]
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        save_jsonl(RATINGS, tmp_path / "nope" / "x.jsonl")


def test_tensor_views():
    ratings = load_ratings(FIXTURES / "ratings.jsonl")
    scores, mask = ratings.scores_tensor()
    assert scores.dtype == torch.float32 and scores.shape == (3, 3)
    assert torch.equal(scores, torch.tensor([[0.5, -0.25, 1.0], [-1.0, -0.75, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(mask, torch.tensor([[True, True, True], [True, True, False], [True, False, False]]))

    pairs = load_pairs(FIXTURES / "pairs.jsonl")
    votes, vmask = pairs.votes_tensor()
    assert torch.equal(votes, torch.tensor([[1.0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]]))
    assert torch.equal(vmask, torch.tensor([[True] * 4, [False] * 4, [True, True, False, False]]))
    margin, present = pairs.margins_tensor(dtype=torch.float64)
    assert torch.equal(margin, torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(present, torch.tensor([True, False, False]))

    attrs = load_attributes(FIXTURES / "attributes.jsonl", attributes=["safety", "helpfulness"])
    assert torch.equal(attrs.attributes_tensor(), torch.tensor([[1.0, 0.75], [0.0, 0.5]]))

    empty = load_ratings([])
    s, m = empty.scores_tensor()
    assert s.shape == (0, 0) and m.shape == (0, 0)
    assert load_attributes([], attributes=["a", "b"]).attributes_tensor().shape == (0, 2)


def test_float64_tensor_keeps_exact_values():
    ds = load_ratings([{"prompt": "p", "response": "r", "scores": [0.1, 1 / 3]}])
    scores, _ = ds.scores_tensor(dtype=torch.float64)
    assert scores.tolist() == [[0.1, 1 / 3]]


def test_loading_writes_nothing_to_home_or_caches(tmp_path):
    """Run loaders in a fresh process whose HOME, HF_HOME, XDG cache and TMPDIR are empty
    directories; afterwards none of them may contain a file (datasets' default cache would)."""
    parquet = _to_parquet(_json_rows(FIXTURES / "pairs.jsonl"), tmp_path / "pairs.parquet")
    dirs = {k: tmp_path / k.lower() for k in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TMPDIR")}
    for d in dirs.values():
        d.mkdir()
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)  # else datasets' default cache would not be under HF_HOME
    code = (
        "from prefcore.data import load_ratings, load_pairs, load_hh_rlhf\n"
        f"assert len(load_ratings({str(FIXTURES / 'ratings.jsonl')!r})) == 3\n"
        f"assert len(load_pairs({str(parquet)!r})) == 3\n"
        f"assert len(load_hh_rlhf({str(FIXTURES / 'hh_rlhf.jsonl')!r})) == 3\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    leftovers = [str(p) for d in dirs.values() for p in d.rglob("*") if p.is_file()]
    assert leftovers == []
