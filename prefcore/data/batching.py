"""Token budgets and batches without wasted compute: truncation that keeps the pooled token, and
length-grouped batches.

**Truncation.** A reward model pools the *last* token of ``prompt + response``, so an over-long
example keeps the end of its response: the prompt is cut from the left first, and only when
the response alone is longer than ``max_length`` is the response's start cut as well (the
prompt is then gone entirely). ``too_long="drop"`` drops such a row instead (TRL's behaviour,
but counted). A pair ``(prompt, chosen, rejected)`` shares one prompt, cut by the same rule so
that *both* ``prompt + chosen`` and ``prompt + rejected`` fit in ``max_length``.
:class:`TruncationStats` counts what each rule did, for one log line.

**Length grouping.** :class:`LengthGroupedBatchSampler` yields batches of rows of similar
length, so no batch is padded out to a rare long row: the epoch's (shuffled) order is cut into
mega-batches (up to 50 global batches, as 🤗 Trainer's ``group_by_length`` does), each sorted by
length, and cut into global batches of ``batch_size × num_replicas`` rows; the longest global
batch goes first (an out-of-memory shows on step one), the others in a seeded random order.
Each global batch is split across ranks in contiguous slices of the sorted order, so ranks get
rows of similar length too (similar step times, no rank waits on another's long rows).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

TOO_LONG = ("truncate", "drop")
_MEGA_BATCH_MAX = 50  # global batches per mega-batch at most (🤗 Trainer's group_by_length uses 50)

logger = logging.getLogger("prefcore.data.batching")


@dataclass
class TruncationStats:
    """Counts of rows that did not fit in ``max_length``.

    ``rows``: rows seen. ``truncated`` / ``dropped``: rows cut / dropped (by ``too_long``).
    ``prompt_cut``: of those, rows whose prompt alone had to be shortened; ``response_cut``: rows
    whose (longer) response alone was over ``max_length``, so its start was cut too (or would have
    been, for a dropped row). ``prompt_cut + response_cut == truncated + dropped``."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    prompt_cut: int = 0
    response_cut: int = 0

    def add(self, outcome: str, too_long: str) -> None:
        """Count one row whose outcome was ``"fits"``, ``"prompt_cut"`` or ``"response_cut"``."""
        self.rows += 1
        if outcome == "fits":
            return
        if too_long == "drop":
            self.dropped += 1
        else:
            self.truncated += 1
        if outcome == "prompt_cut":
            self.prompt_cut += 1
        else:
            self.response_cut += 1

    def merge(self, other: TruncationStats) -> TruncationStats:
        """The counts of both (e.g. train and eval splits, or all ranks)."""
        return TruncationStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def message(self, max_length: int, too_long: str) -> str:
        """One log line, e.g. ``max_length=512, too_long=truncate: 7 of 1000 rows too long — 7
        truncated, 0 dropped (5 prompt cut from the left, 2 also the response's start)``."""
        affected = self.truncated + self.dropped
        return (f"max_length={max_length}, too_long={too_long}: {affected} of {self.rows} rows too long — "
                f"{self.truncated} truncated, {self.dropped} dropped ({self.prompt_cut} prompt cut from the left, "
                f"{self.response_cut} also the response's start)")

    def log(self, max_length: int, too_long: str, log: logging.Logger | None = None) -> str:
        """Log :meth:`message` at INFO (WARNING when any row was dropped) and return it."""
        msg = self.message(max_length, too_long)
        (log or logger).log(logging.WARNING if self.dropped else logging.INFO, msg)
        return msg


def _check_ids(ids: object, name: str, *, allow_empty: bool) -> list[int]:
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    if not allow_empty and len(ids) == 0:
        raise ValueError(f"{name} must hold at least one token id (the pooled last token is the response's), got []")
    return list(ids)


def _check_budget(max_length: object, too_long: object) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    return max_length


def _cut(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int, str]:
    """``(prompt tokens kept, response tokens kept, outcome)`` for lengths under ``max_length``."""
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len, "fits"
    if response_len <= max_length:
        return max_length - response_len, response_len, "prompt_cut"
    return 0, max_length, "response_cut"


def truncate_example(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int,
                     too_long: str = "truncate", *, stats: TruncationStats | None = None) -> list[int] | None:
    """``prompt_ids + response_ids`` fitted into ``max_length`` tokens, or None when dropped.

    Keeps the end of the response (the pooled last token): the prompt is cut from the left
    first; when ``len(response_ids) > max_length`` the prompt is gone and the response keeps its
    last ``max_length`` tokens. ``too_long="drop"`` returns None for any row that does not fit.
    ``stats`` (optional) counts the outcome."""
    max_length = _check_budget(max_length, too_long)
    prompt = _check_ids(prompt_ids, "prompt_ids", allow_empty=True)
    response = _check_ids(response_ids, "response_ids", allow_empty=False)
    keep_p, keep_r, outcome = _cut(len(prompt), len(response), max_length)
    if stats is not None:
        stats.add(outcome, too_long)
    if outcome != "fits" and too_long == "drop":
        return None
    return prompt[len(prompt) - keep_p:] + response[len(response) - keep_r:]


def truncate_pair(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int], max_length: int,
                  too_long: str = "truncate", *, stats: TruncationStats | None = None,
                  ) -> tuple[list[int], list[int], list[int]] | None:
    """``(prompt, chosen, rejected)`` fitted so that ``prompt + chosen`` and ``prompt + rejected``
    each hold at most ``max_length`` tokens, or None when dropped.

    The shared prompt is cut from the left to ``max_length − max(len(chosen), len(rejected))``
    tokens; a response longer than ``max_length`` keeps its last ``max_length`` tokens (the
    prompt is then empty). The other response is untouched unless it is over-long itself.
    ``stats`` (optional) counts the pair as one row."""
    max_length = _check_budget(max_length, too_long)
    prompt = _check_ids(prompt_ids, "prompt_ids", allow_empty=True)
    chosen = _check_ids(chosen_ids, "chosen_ids", allow_empty=False)
    rejected = _check_ids(rejected_ids, "rejected_ids", allow_empty=False)
    keep_p, _, outcome = _cut(len(prompt), max(len(chosen), len(rejected)), max_length)
    if stats is not None:
        stats.add(outcome, too_long)
    if outcome != "fits" and too_long == "drop":
        return None
    return prompt[len(prompt) - keep_p:], chosen[-max_length:], rejected[-max_length:]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → ``input_ids (N, T)`` int64 and ``attention_mask (N, T)`` int64 (1 = token),
    ``T`` the longest row (0 when every row is empty), padded on ``side`` (``"left"``/``"right"``)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")
    rows = [_check_ids(r, f"rows[{i}]", allow_empty=True) for i, r in enumerate(rows)]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def collate_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], pad_id: int, side: str = "right",
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """``(prompt, chosen, rejected)`` id lists (e.g. from :func:`truncate_pair`) → three padded
    ``(input_ids, attention_mask)`` batches, the input of
    :func:`prefcore.models.packing.pair_features`."""
    if len(pairs) == 0:
        raise ValueError("pairs must hold at least one (prompt, chosen, rejected) triple")
    return tuple(pad_rows([pair[k] for pair in pairs], pad_id, side) for k in range(3))  # type: ignore[return-value]


def pair_length(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int], packing: str) -> int:
    """The tokens a pair pads to in its batch, for :class:`LengthGroupedBatchSampler`:
    ``P + C + R`` packed (one ``[prompt|chosen|rejected]`` row), ``P + max(C, R)`` plain."""
    if packing not in ("packed", "plain"):
        raise ValueError(f"packing must be 'packed' or 'plain', got {packing!r}")
    p, c, r = len(prompt_ids), len(chosen_ids), len(rejected_ids)
    return p + c + r if packing == "packed" else p + max(c, r)


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class LengthGroupedBatchSampler:
    """Batches of row indices of similar length, sharded over ranks; a ``batch_sampler`` for
    :class:`torch.utils.data.DataLoader`.

    ``lengths[i]``: the token count that pads row ``i`` (for a packed pair,
    ``len(prompt) + len(chosen) + len(rejected)``). Each epoch every index appears exactly
    once over all ranks' batches (one exception: when the last global batch holds fewer rows
    than ``num_replicas`` and ``drop_last`` is False, it is topped up with the epoch's first
    indices, as :class:`~torch.utils.data.DistributedSampler` pads, so no rank gets an empty
    batch). Every rank yields ``len(self)`` batches: ``ceil(N / (batch_size·num_replicas))``,
    or the floor with ``drop_last`` (which drops the one partial global batch). A partial last
    global batch is split over the ranks in near-equal slices.

    The order is a function of ``(seed, epoch)`` only (call :meth:`set_epoch` each epoch), so
    all ranks agree without communicating. ``shuffle=False`` sorts all rows by length,
    longest first (for scoring or evaluation: the least padding)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        if not isinstance(lengths, Sequence) or isinstance(lengths, (str, bytes)):
            raise TypeError(f"lengths must be a sequence of integers, got {type(lengths).__name__}")
        bad = [i for i, n in enumerate(lengths) if isinstance(n, bool) or not isinstance(n, int) or n < 0]
        if bad:
            raise ValueError(f"lengths must hold non-negative integers; entries {bad[:8]} are {[lengths[i] for i in bad[:8]]}")
        if len(lengths) == 0:
            raise ValueError("lengths must not be empty")
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.num_replicas = _check_int(num_replicas, "num_replicas", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {rank}")
        self.seed = _check_int(seed, "seed", 0)
        self.lengths = torch.tensor(list(lengths), dtype=torch.long)
        self.shuffle, self.drop_last, self.epoch = bool(shuffle), bool(drop_last), 0
        if self.drop_last and len(self.lengths) < self.global_batch:
            raise ValueError(f"drop_last=True with {len(self.lengths)} rows < batch_size × num_replicas = "
                             f"{self.global_batch} leaves no batch")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (the same on every rank)."""
        self.epoch = _check_int(epoch, "epoch", 0)

    def __len__(self) -> int:
        n, g = len(self.lengths), self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (``batch_size × num_replicas`` rows each, the last one maybe
        fewer), each sorted by length, longest first; the same on every rank."""
        n, g = len(self.lengths), self.global_batch
        # descending sort, ties kept in the given order (stable) so the result is deterministic
        by_length = lambda idx: idx[torch.sort(self.lengths[idx], descending=True, stable=True).indices]  # noqa: E731
        if not self.shuffle:
            order = by_length(torch.arange(n))
            return [order[i:i + g].tolist() for i in range(0, n, g)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(n, generator=gen)
        mega = g * max(1, min(n // (g * 4), _MEGA_BATCH_MAX))
        order = torch.cat([by_length(perm[i:i + mega]) for i in range(0, n, mega)])
        batches = [order[i:i + g] for i in range(0, n, g)]
        partial = [batches.pop()] if len(batches[-1]) < g else []
        if batches:
            # the longest global batch first, the rest in random order; the partial batch stays last
            first = max(range(len(batches)), key=lambda i: (int(self.lengths[batches[i]].max()), -i))
            head = batches.pop(first)
            rest = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            batches = [head] + rest
        return [b.tolist() for b in batches + partial]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        if self.drop_last and len(batches[-1]) < self.global_batch:
            batches.pop()
        for b in batches:
            if len(b) == self.global_batch:
                yield b[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                continue
            if len(b) < self.num_replicas:  # top up so no rank gets an empty batch (see class docstring)
                flat = [i for batch in batches for i in batch]
                b = b + (flat * self.num_replicas)[:self.num_replicas - len(b)]
            # near-equal contiguous slices: the first (len % R) ranks get one row more
            q, r = divmod(len(b), self.num_replicas)
            start = self.rank * q + min(self.rank, r)
            yield b[start:start + q + (self.rank < r)]
