"""prefcore.data.batching: truncation that keeps the response's end, its counts, and the
length-grouped, rank-sharded batch sampler.

References are closed forms: a truncated example is the last ``max_length`` tokens of
``prompt + response``; a pair keeps the last ``max_length − max(|chosen|, |rejected|)`` prompt
tokens; a sampler epoch is a partition of ``range(N)``.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch

from prefcore.data.batching import (
    LengthGroupedBatchSampler,
    TruncationStats,
    collate_pairs,
    pad_rows,
    pair_length,
    truncate_example,
    truncate_pair,
)

# ---------------------------------------------------------------------------- truncation


def test_truncate_example_cases():
    p, r = [1, 2, 3, 4], [5, 6, 7]
    assert truncate_example(p, r, 7) == [1, 2, 3, 4, 5, 6, 7]  # fits: untouched
    assert truncate_example(p, r, 5) == [3, 4, 5, 6, 7]  # prompt cut from the left
    assert truncate_example(p, r, 3) == [5, 6, 7]  # prompt gone, response whole
    assert truncate_example(p, r, 2) == [6, 7]  # response's start cut, its end kept
    assert truncate_example([], [9], 1) == [9]
    assert truncate_example(p, r, 5, "drop") is None
    assert truncate_example(p, r, 7, "drop") == [1, 2, 3, 4, 5, 6, 7]


def test_truncate_example_is_the_suffix_of_the_concatenation():
    rng = random.Random(0)
    for _ in range(300):
        p = [rng.randrange(100) for _ in range(rng.randrange(0, 12))]
        r = [rng.randrange(100) for _ in range(rng.randrange(1, 12))]
        m = rng.randrange(1, 25)
        assert truncate_example(p, r, m) == (p + r)[-m:]
        assert truncate_example(p, r, m, "drop") == (p + r if len(p) + len(r) <= m else None)


def test_truncate_pair_cases():
    p, c, r = [1, 2, 3, 4, 5], [10, 11], [20, 21, 22, 23]
    assert truncate_pair(p, c, r, 9) == (p, c, r)
    # the longer response (4) sets the prompt budget: 6 − 4 = 2 prompt tokens, both fit in 6
    assert truncate_pair(p, c, r, 6) == ([4, 5], c, r)
    assert truncate_pair(p, c, r, 4) == ([], c, r)
    # rejected alone is over-long: its start is cut, chosen is untouched, the prompt is gone
    assert truncate_pair(p, c, r, 3) == ([], c, [21, 22, 23])
    assert truncate_pair(p, c, r, 8, "drop") is None
    rng = random.Random(1)
    for _ in range(300):
        p = [rng.randrange(100) for _ in range(rng.randrange(0, 10))]
        c = [rng.randrange(100) for _ in range(rng.randrange(1, 10))]
        r = [rng.randrange(100) for _ in range(rng.randrange(1, 10))]
        m = rng.randrange(1, 20)
        tp, tc, tr = truncate_pair(p, c, r, m)
        assert len(tp) + len(tc) <= m and len(tp) + len(tr) <= m
        assert tc == c[-m:] and tr == r[-m:] and p[len(p) - len(tp):] == tp
        # the prompt keeps as much as both fits allow
        assert len(tp) == min(len(p), max(0, m - max(len(c), len(r))))


def test_truncation_stats_counts_and_log(caplog):
    stats = TruncationStats()
    p, r = [1, 2, 3, 4], [5, 6, 7]
    truncate_example(p, r, 10, stats=stats)  # fits
    truncate_example(p, r, 5, stats=stats)  # prompt cut
    truncate_example(p, r, 2, stats=stats)  # response cut
    truncate_pair(p, [5], [6, 7, 8], 4, stats=stats)  # prompt cut (by the longer response)
    assert stats.as_dict() == dict(rows=4, truncated=3, dropped=0, prompt_cut=2, response_cut=1)
    dropped = TruncationStats()
    for m in (10, 5, 2):
        truncate_example(p, r, m, "drop", stats=dropped)
    assert dropped.as_dict() == dict(rows=3, truncated=0, dropped=2, prompt_cut=1, response_cut=1)
    total = stats.merge(dropped)
    assert total.as_dict() == dict(rows=7, truncated=3, dropped=2, prompt_cut=3, response_cut=2)
    with caplog.at_level(logging.INFO, logger="prefcore.data.batching"):
        msg = total.log(5, "truncate")
    assert "5 of 7 rows too long" in msg and "3 truncated, 2 dropped" in msg and "3 prompt cut" in msg
    assert caplog.records[-1].levelno == logging.WARNING  # rows were dropped: a warning, not info


@pytest.mark.parametrize("call, match", [
    (lambda: truncate_example([1], [2], 0), "max_length must be an integer >= 1"),
    (lambda: truncate_example([1], [2], 4, "cut"), "too_long must be one of"),
    (lambda: truncate_example([1], [], 4), "response_ids must hold at least one token"),
    (lambda: truncate_example("ab", [1], 4), "prompt_ids must be a list of token ids"),
    (lambda: truncate_pair([1], [2], [], 4), "rejected_ids must hold at least one token"),
])
def test_truncation_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------- collation


def test_pad_rows_and_collate_pairs():
    ids, mask = pad_rows([[5, 6], [], [7]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6], [0, 0], [0, 7]] and mask.tolist() == [[1, 1], [0, 0], [0, 1]]
    ids, mask = pad_rows([[5, 6], [7]], pad_id=9)
    assert ids.tolist() == [[5, 6], [7, 9]] and mask.tolist() == [[1, 1], [1, 0]]
    assert pad_rows([[], []], 0)[0].shape == (2, 0)
    (pi, pm), (ci, cm), (ri, rm) = collate_pairs([([1], [2, 3], [4]), ([], [5], [6, 7, 8])], pad_id=0)
    assert pi.tolist() == [[1], [0]] and ci.tolist() == [[2, 3], [5, 0]] and rm.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert pair_length([1, 2], [3], [4, 5, 6], "packed") == 6 and pair_length([1, 2], [3], [4, 5, 6], "plain") == 5
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        pad_rows([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="pairs must hold at least one"):
        collate_pairs([], 0)
    with pytest.raises(ValueError, match="packing must be 'packed' or 'plain'"):
        pair_length([1], [2], [3], "auto")


# ---------------------------------------------------------------------------- sampler


def _heavy_tailed_lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.empty(n).log_normal_(4.0, 0.8, generator=g).long() + 1).tolist()


def _epoch(lengths, batch_size, replicas, epoch=0, **kw) -> list[list[list[int]]]:
    """Each rank's batches for one epoch."""
    out = []
    for rank in range(replicas):
        s = LengthGroupedBatchSampler(lengths, batch_size, num_replicas=replicas, rank=rank, **kw)
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        out.append(batches)
    return out


@pytest.mark.parametrize("n, batch_size, replicas, shuffle", [
    (1000, 8, 1, True), (1003, 8, 1, True), (1000, 4, 3, True), (50, 7, 2, False), (8, 8, 1, True), (1, 3, 1, True),
])
def test_every_index_once_per_epoch(n, batch_size, replicas, shuffle):
    lengths = _heavy_tailed_lengths(n)
    per_rank = _epoch(lengths, batch_size, replicas, shuffle=shuffle, seed=3)
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    assert len(per_rank[0]) == -(-n // (batch_size * replicas))
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert seen == list(range(n))
    assert all(1 <= len(b) <= batch_size for batches in per_rank for b in batches)


def test_deterministic_per_seed_and_epoch():
    lengths = _heavy_tailed_lengths(600)
    a = _epoch(lengths, 8, 2, epoch=1, seed=5)
    assert a == _epoch(lengths, 8, 2, epoch=1, seed=5)
    assert a != _epoch(lengths, 8, 2, epoch=2, seed=5)
    assert a != _epoch(lengths, 8, 2, epoch=1, seed=6)


def test_batches_group_similar_lengths():
    """Padding to each batch's longest row costs far less than with random batches of the same
    size (the 🤗 group_by_length effect), and the longest row is in the first batch."""
    lengths = _heavy_tailed_lengths(4000)
    batches = _epoch(lengths, 8, 1, seed=0)[0]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_padded = sum(8 * max(lengths[i] for i in perm[k:k + 8]) for k in range(0, len(perm), 8))
    assert padded < 1.15 * sum(lengths) < random_padded / 1.3
    assert max(range(len(lengths)), key=lengths.__getitem__) in batches[0]


def test_ranks_split_each_global_batch_by_length():
    lengths = _heavy_tailed_lengths(512)
    per_rank = _epoch(lengths, 4, 4, seed=2)
    s = LengthGroupedBatchSampler(lengths, 4, num_replicas=4, rank=0, seed=2)
    for step, glob in enumerate(s.global_batches()):
        assert [per_rank[r][step] for r in range(4)] == [glob[4 * r:4 * r + 4] for r in range(4)]
        assert [lengths[i] for i in glob] == sorted((lengths[i] for i in glob), reverse=True)


def test_no_shuffle_sorts_longest_first():
    lengths = [3, 9, 1, 9, 4, 7, 2]
    batches = list(LengthGroupedBatchSampler(lengths, 3, shuffle=False))
    assert batches == [[1, 3, 5], [4, 0, 6], [2]]


def test_drop_last_and_partial_split():
    lengths = _heavy_tailed_lengths(23)
    per_rank = _epoch(lengths, 3, 2, drop_last=True)
    assert [len(b) for b in per_rank] == [3, 3] and all(len(x) == 3 for b in per_rank for x in b)
    # without drop_last, 23 = 3·6 + 5: the last global batch of 5 is split 3 / 2
    per_rank = _epoch(lengths, 3, 2, drop_last=False)
    assert [len(per_rank[r][-1]) for r in range(2)] == [3, 2]
    # fewer rows left than ranks: topped up so no rank gets an empty batch
    per_rank = _epoch(lengths[:9], 2, 4)
    assert all(len(b[-1]) == 1 for b in per_rank)
    assert set(i for b in per_rank for x in b for i in x) == set(range(9))


def test_dataloader_batch_sampler():
    data = list(range(37))
    sampler = LengthGroupedBatchSampler([x % 7 for x in data], 5, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    assert sorted(torch.cat(list(loader)).tolist()) == data


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=[], batch_size=2), "lengths must not be empty"),
    (dict(lengths=[1, -2], batch_size=2), r"non-negative integers; entries \[1\]"),
    (dict(lengths=[1, 2], batch_size=0), "batch_size must be an integer >= 1"),
    (dict(lengths=[1, 2], batch_size=1, num_replicas=2, rank=2), r"rank must be in \[0, num_replicas=2\)"),
    (dict(lengths=[1, 2], batch_size=2, num_replicas=2, drop_last=True), "leaves no batch"),
])
def test_sampler_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LengthGroupedBatchSampler(kwargs.pop("lengths"), kwargs.pop("batch_size"), **kwargs)
