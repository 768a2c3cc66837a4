"""Reading rows from JSONL/Parquet files (through 🤗 ``datasets``) or from Python records,
validating them into typed collections, and writing records back as JSONL.

Loading never touches the network and never writes into the user's cache: files are read
with ``datasets.Dataset.from_json`` / ``from_parquet`` (local packaged builders) into memory
(``keep_in_memory=True``), with the builder's scratch files in a temporary directory that is
deleted before the function returns.

Row indices in errors and in ``skipped_rows`` are 0-based positions of the data rows in the
source (for JSONL: the n-th non-blank line; a JSON syntax error reports the 1-based line).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from prefcore._io import atomic_write
from prefcore.data.containers import AttributesDataset, PairsDataset, RatingsDataset
from prefcore.data.schemas import (
    DEFAULT_ATTR_RANGE,
    DEFAULT_SCORE_RANGE,
    DataValidationError,
    Where,
    check_attribute_names,
    check_range_arg,
    parse_attributes,
    parse_pair,
    parse_rating,
)

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
RowSource = PathLike | Iterable[Mapping[str, Any]]

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# How many skipped-row messages a collection keeps (all indices are kept).
MAX_SKIPPED_ERRORS = 5

T = TypeVar("T")


def read_rows(path_or_records: RowSource) -> tuple[str, list[Any]]:
    """Read raw rows: ``(source_name, rows)``.

    ``path_or_records``: a ``.jsonl``/``.json`` or ``.parquet`` path (read through ``datasets``,
    local only), or any iterable of mappings (a list of dicts, a ``datasets.Dataset``, ...),
    named ``"<records>"``. Rows are returned as they are; validation is the caller's job.
    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unknown suffix,
    ``TypeError`` for anything else, and :class:`DataValidationError` for JSON that does not parse.
    """
    if isinstance(path_or_records, (str, os.PathLike)):
        path = Path(path_or_records)
        if not path.is_file():
            raise FileNotFoundError(f"path_or_records: no such file: {str(path)!r}")
        suffix = path.suffix.lower()
        if suffix in JSON_SUFFIXES:
            return str(path), _read_json(path)
        if suffix in PARQUET_SUFFIXES:
            return str(path), _read_parquet(path)
        raise ValueError(
            f"path_or_records must end in one of {JSON_SUFFIXES + PARQUET_SUFFIXES}, got {str(path)!r}"
        )
    if isinstance(path_or_records, (Mapping, bytes)) or not isinstance(path_or_records, Iterable):
        raise TypeError(
            "path_or_records must be a file path or an iterable of row mappings, "
            f"got {type(path_or_records).__name__}"
        )
    return "<records>", list(path_or_records)


def _is_blank(path: Path, chunk: int = 1 << 16) -> bool:
    """True if the file holds only whitespace (stops at the first other byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _read_json(path: Path) -> list[Any]:
    if _is_blank(path):  # datasets' JSON builder fails on an empty file instead of giving 0 rows
        return []
    import datasets  # lazy: importing datasets costs ~1 s and most of prefcore never needs it

    with tempfile.TemporaryDirectory(prefix="prefcore-data-") as cache_dir, _datasets_warnings_off():
        try:
            ds = datasets.Dataset.from_json(str(path), cache_dir=cache_dir, keep_in_memory=True)
        except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as exc:
            # A line that is not JSON, or JSON that is not an object: name the file and line
            # instead of the builder's "An error occurred while generating the dataset".
            err = _json_row_error(path)
            if err is None:
                raise
            raise err from exc
        # datasets types a column whose rows disagree (a string among numbers) as Json and hands
        # back the original values, so the validators still see what the file holds.
        return ds.to_list()


@contextlib.contextmanager
def _datasets_warnings_off():
    """datasets logs an error line ("Failed to load JSON from file …") before it raises on a bad
    JSON line; the error we raise (file, line, problem) says it all, so its logging is off while a
    file is read."""
    import datasets.utils.logging as ds_logging

    verbosity = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)


def _json_row_error(path: Path) -> DataValidationError | None:
    """Re-scan a JSONL file the builder could not read, to name the first line that is not one JSON
    object (invalid JSON — e.g. a line cut mid-object — or a JSON array, string or number)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                at = f"{exc.msg} column {exc.colno}" if exc.msg.endswith(" at") else f"{exc.msg} at column {exc.colno}"
                if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
                    got = f"invalid JSON: the line ends mid-object, cut short? ({at})"
                else:
                    got = f"invalid JSON ({at})"
                return DataValidationError(f"{path}, line {lineno}", None, "<json>", "one JSON object per line", got)
            if not isinstance(value, dict):
                kind = {list: "a JSON array", str: "a JSON string", bool: "a JSON boolean"}.get(
                    type(value), "JSON null" if value is None else "a JSON number")
                shown = text.strip() if len(text.strip()) <= 60 else text.strip()[:57] + "..."
                return DataValidationError(f"{path}, line {lineno}", None, "<json>", "one JSON object per line",
                                           f"{kind}: {shown}")
    return None


def _read_parquet(path: Path) -> list[Any]:
    import datasets

    with tempfile.TemporaryDirectory(prefix="prefcore-data-") as cache_dir:
        ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, keep_in_memory=True)
        return ds.to_list()


def collect(rows: Sequence[Any], source: str, parse: Callable[[Any, Where], Sequence[T]], *, skip_invalid: bool
            ) -> tuple[tuple[T, ...], dict[str, Any]]:
    """Parse every row with ``parse(row, where) -> records`` (a row may give 0..k records).

    Returns the records in order and the skip report (``num_skipped``, ``skipped_rows``,
    ``skipped_errors``) as keyword arguments for a :class:`RecordSet`. With ``skip_invalid=False``
    the first :class:`DataValidationError` propagates; with ``True`` bad rows are skipped,
    counted, and summarised in one log warning.
    """
    if not isinstance(skip_invalid, bool):
        raise TypeError(f"skip_invalid must be a bool, got {type(skip_invalid).__name__}")
    out: list[T] = []
    skipped: list[int] = []
    messages: list[str] = []
    for i, row in enumerate(rows):
        try:
            out.extend(parse(row, Where(source, i)))
        except DataValidationError as exc:
            if not skip_invalid:
                raise
            skipped.append(i)
            if len(messages) < MAX_SKIPPED_ERRORS:
                messages.append(str(exc))
    if skipped:
        logger.warning("%s: skipped %d invalid row(s) of %d (first: %s)", source, len(skipped), len(rows),
                       messages[0])
    report = dict(source=source, num_skipped=len(skipped), skipped_rows=tuple(skipped), skipped_errors=tuple(messages))
    return tuple(out), report


def load_ratings(path_or_records: RowSource, *, score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
                 skip_invalid: bool = False) -> RatingsDataset:
    """Load ratings rows ``{prompt, response, scores: [float], annotator_ids?: [str]}``.

    Every score must be a finite number in the closed ``score_range`` (default [−1, 1]).
    ``skip_invalid=True`` drops bad rows and reports them on the result instead of raising.
    """
    score_range = check_range_arg(score_range, "score_range")
    source, rows = read_rows(path_or_records)
    records, report = collect(rows, source, lambda r, w: (parse_rating(r, score_range=score_range, where=w),),
                              skip_invalid=skip_invalid)
    return RatingsDataset(records=records, score_range=score_range, **report)


def load_pairs(path_or_records: RowSource, *, skip_invalid: bool = False) -> PairsDataset:
    """Load pairs rows ``{prompt, chosen, rejected, votes?: [0|1], margin?: float}``."""
    source, rows = read_rows(path_or_records)
    records, report = collect(rows, source, lambda r, w: (parse_pair(r, where=w),), skip_invalid=skip_invalid)
    return PairsDataset(records=records, **report)


def load_attributes(path_or_records: RowSource, *, attributes: Sequence[str],
                    attr_range: tuple[float, float] = DEFAULT_ATTR_RANGE, skip_invalid: bool = False
                    ) -> AttributesDataset:
    """Load attribute rows ``{prompt, response, <attr>: float, ...}``.

    ``attributes`` names the columns to read (each required in every row, finite, inside the
    closed ``attr_range``, default [0, 1]); other columns are ignored.
    """
    names = check_attribute_names(attributes)
    attr_range = check_range_arg(attr_range, "attr_range")
    source, rows = read_rows(path_or_records)
    records, report = collect(
        rows, source, lambda r, w: (parse_attributes(r, attributes=names, attr_range=attr_range, where=w),),
        skip_invalid=skip_invalid)
    return AttributesDataset(records=records, attributes=names, attr_range=attr_range, **report)


def save_jsonl(records: Iterable[Any], path: PathLike) -> int:
    """Write records (anything with ``to_dict()``, or plain mappings) as JSONL, atomically.

    The rows go to a temporary file in the destination directory, which is flushed, fsynced and
    then renamed over ``path``; a failure leaves any previous file untouched. Strict JSON:
    non-finite floats raise ``ValueError`` naming the record. Returns the number of rows written.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: directory does not exist: {str(path.parent)!r}")
    n = 0

    def write(tmp: str) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for i, rec in enumerate(records):
                row = rec.to_dict() if hasattr(rec, "to_dict") else rec
                if not isinstance(row, Mapping):
                    raise TypeError(f"records[{i}] must be a record or a mapping, got {type(rec).__name__}")
                try:
                    line = json.dumps(dict(row), ensure_ascii=False, allow_nan=False)
                except ValueError as exc:
                    raise ValueError(f"records[{i}] is not strict JSON (NaN/infinity are not allowed): {exc}") from exc
                f.write(line + "\n")
                n += 1

    atomic_write(path, write)
    return n
