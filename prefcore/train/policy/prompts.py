"""Prompts for policy optimisation: a ``datasets.Dataset`` (or any iterable of rows) with a
``prompt`` column, a JSONL/Parquet file, or a list of strings. Bad rows raise
:class:`~prefcore.data.schemas.DataValidationError` naming the source, row and field, as ``train-rm`` does."""
from __future__ import annotations

import os
from collections.abc import Mapping

from prefcore.data.io import collect, read_rows
from prefcore.data.schemas import Where


def _parse(row: object, where: Where) -> tuple[str]:
    if isinstance(row, str):
        text = row
    elif isinstance(row, Mapping):
        text = row.get("prompt")
    else:
        raise where.error("<row>", "a mapping with a 'prompt' field (or a string)", row)
    if not isinstance(text, str) or not text.strip():
        raise where.error("prompt", "a non-empty string", text)
    return (text,)


def load_prompts(source: object) -> list[str]:
    """Prompts as a list of strings (see the module docstring); at least one is required."""
    if isinstance(source, (str, os.PathLike)):
        name, rows = read_rows(source)
    elif isinstance(source, (list, tuple)):
        name, rows = "<prompts>", list(source)
    elif hasattr(source, "column_names"):  # datasets.Dataset
        if "prompt" not in source.column_names:
            raise ValueError(f"prompts: the dataset has no 'prompt' column (columns: {source.column_names})")
        name, rows = "<dataset>", list(source["prompt"])
    else:
        raise ValueError(f"prompts: expected a datasets.Dataset, a JSONL/Parquet path or a list of strings, "
                         f"got {type(source).__name__}")
    prompts, _ = collect(rows, name, _parse, skip_invalid=False)
    if not prompts:
        raise ValueError(f"prompts: {name} holds no prompts")
    return list(prompts)
