"""Typed, immutable collections of loaded records, with batch-first tensor views.

Each collection holds its records in source order, the source name, and what loading skipped
(``num_skipped``, the 0-based source row indices in ``skipped_rows`` and the first few error
messages in ``skipped_errors``). Tensor views are built on demand on the requested device.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from prefcore.data.schemas import AttributeRecord, PairRecord, RatingRecord

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class RecordSet(Generic[R]):
    """Records loaded from one source plus a report of the rows that were skipped."""

    records: tuple[R, ...]
    source: str = "<records>"
    num_skipped: int = 0
    skipped_rows: tuple[int, ...] = ()
    skipped_errors: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)

    def __getitem__(self, i: int) -> R:
        return self.records[i]


def _padded(rows: Sequence[Sequence[float]], dtype: torch.dtype, device: torch.device | str | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ragged rows with 0 into ``(B, N_max)`` values and a ``(B, N_max)`` bool mask."""
    b = len(rows)
    n = max((len(r) for r in rows), default=0)
    values = torch.zeros(b, n, dtype=torch.float64)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            values[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
            mask[i, : len(r)] = True
    # Build in float64 and cast once, so float64 callers get the exact stored values.
    return values.to(device=device, dtype=dtype), mask.to(device=device)


@dataclass(frozen=True, kw_only=True)
class RatingsDataset(RecordSet[RatingRecord]):
    """Ratings records; ``score_range`` is the declared (validated) closed range of the scores."""

    score_range: tuple[float, float]

    def scores_tensor(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (B, N), mask (B, N) bool)`` with ``N = max`` scores per record; record i's
        scores fill ``scores[i, :N_i]`` in order, the rest is 0 with ``mask`` False. This is the
        ``target``/``target_mask`` layout of ``prefcore.ops.pinball_loss``. Empty → ``(0, 0)``."""
        return _padded([r.scores for r in self.records], dtype, device)


@dataclass(frozen=True, kw_only=True)
class PairsDataset(RecordSet[PairRecord]):
    """Pair records."""

    def votes_tensor(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(votes (B, N), mask (B, N) bool)``, right-padded like :meth:`RatingsDataset.scores_tensor`;
        a record without votes is an all-False mask row."""
        return _padded([r.votes or () for r in self.records], dtype, device)

    def margins_tensor(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(margin (B,), present (B,) bool)``; 0 where a record has no margin."""
        values = torch.tensor([r.margin if r.margin is not None else 0.0 for r in self.records], dtype=torch.float64)
        present = torch.tensor([r.margin is not None for r in self.records], dtype=torch.bool)
        return values.to(device=device, dtype=dtype), present.to(device=device)


@dataclass(frozen=True, kw_only=True)
class AttributesDataset(RecordSet[AttributeRecord]):
    """Attribute records; ``attributes`` are the declared names (column order of the tensor view)
    and ``attr_range`` their declared closed range."""

    attributes: tuple[str, ...]
    attr_range: tuple[float, float]

    def attributes_tensor(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                          ) -> torch.Tensor:
        """``(B, M)`` values, column m = ``attributes[m]``. Empty → ``(0, M)``."""
        values = torch.tensor([[r.attributes[a] for a in self.attributes] for r in self.records],
                              dtype=torch.float64).reshape(len(self.records), len(self.attributes))
        return values.to(device=device, dtype=dtype)
