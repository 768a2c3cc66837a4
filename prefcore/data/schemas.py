"""Record types of prefcore's three data schemas and their row validators (DESIGN §4).

* ratings    ``{prompt, response, scores: [float], annotator_ids?: [str]}``
* pairs      ``{prompt, chosen, rejected, votes?: [0|1], margin?: float}``
* attributes ``{prompt, response, <attr>: float, ...}``

A row is a mapping (one JSON object, one Parquet row, one dict). ``parse_rating``,
``parse_pair`` and ``parse_attributes`` turn a row into a frozen record or raise
:class:`DataValidationError` naming the source, the row index, the field, and what was
expected vs. received. The first problem found in a row is the one reported.

Rules shared by every schema (decisions, since DESIGN is silent):

* Text fields must be ``str`` with at least one non-whitespace character; the text is kept
  exactly as given (never stripped), so a record round-trips byte for byte.
* Numbers must be real numbers (``int``, ``float`` or NumPy scalars; ``bool`` and numeric
  strings such as ``"0.5"`` are rejected: silently coercing them hides broken exports), finite,
  and inside the declared closed range. Lists must be ``list`` or ``tuple``.
* A missing field and a ``null`` field are the same thing (Arrow fills absent columns with
  ``null``); optional fields may be absent or ``null``.
* Fields a schema does not know are ignored, so source rows may carry ids and metadata.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Ratings live on [-1, 1] unless the caller declares otherwise (DFL rates on [-1, 1]).
DEFAULT_SCORE_RANGE: tuple[float, float] = (-1.0, 1.0)
# Attributes are normalised to [0, 1] by the adapters (e.g. HelpSteer2's 0-4 Likert / 4).
DEFAULT_ATTR_RANGE: tuple[float, float] = (0.0, 1.0)

_REPR_LIMIT = 80
_RESERVED_ATTRIBUTE_NAMES = frozenset({"prompt", "response"})


class DataValidationError(ValueError):
    """A data row that does not match its schema.

    Attributes ``source`` (file path, or a name such as ``"<records>"``), ``row`` (0-based row
    index in the source, ``None`` when validating a record built directly), ``field`` (``"scores[2]"``,
    ``"chosen"``, ...), ``expected`` and ``received`` (short text). The message reads
    ``"<source>, row <i>, field '<field>': expected <expected>, got <received>"``.
    """

    def __init__(self, source: str, row: int | None, field: str, expected: str, received: str) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.expected = expected
        self.received = received
        where = source if row is None else f"{source}, row {row}"
        super().__init__(f"{where}, field '{field}': expected {expected}, got {received}")

    def __reduce__(self):  # keep the structured fields across pickling (multiprocess loaders)
        return (type(self), (self.source, self.row, self.field, self.expected, self.received))


@dataclass(frozen=True)
class Where:
    """Where a row came from, for error messages: the source name and the 0-based row index."""

    source: str = "<records>"
    row: int | None = None

    def error(self, field: str, expected: str, value: Any) -> DataValidationError:
        return DataValidationError(self.source, self.row, field, expected, describe(value))


def describe(value: Any) -> str:
    """Short text for a received value: ``missing`` for ``None``, else type and truncated repr."""
    if value is None:
        return "missing (absent or null)"
    text = repr(value)
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    return f"{type(value).__name__} {text}"


# --------------------------------------------------------------------------- field checks


def is_bool(value: Any) -> bool:
    # NumPy's bool is not a subclass of bool; recognise it by name to avoid importing numpy.
    t = type(value)
    return isinstance(value, bool) or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"))


def check_text(value: Any, field: str, where: Where) -> str:
    """A non-empty string (at least one non-whitespace character), returned unchanged."""
    if not isinstance(value, str):
        raise where.error(field, "a non-empty string", value)
    if not value.strip():
        raise where.error(field, "a non-empty string (not empty or whitespace-only)", value)
    return value


def check_number(value: Any, field: str, where: Where, value_range: tuple[float, float] | None = None) -> float:
    """A finite real number (``int``, ``float``, NumPy scalars; not ``bool``, not a string)
    inside ``value_range`` (closed), returned as ``float``."""
    if is_bool(value) or not isinstance(value, numbers.Real):
        expected = "a finite number" if value_range is None else f"a finite number in [{value_range[0]:g}, {value_range[1]:g}]"
        raise where.error(field, expected, value)
    v = float(value)
    if not math.isfinite(v):
        raise where.error(field, "a finite number (not NaN or infinite)", value)
    if value_range is not None and not (value_range[0] <= v <= value_range[1]):
        raise where.error(field, f"a number in [{value_range[0]:g}, {value_range[1]:g}]", value)
    return v


def check_list(value: Any, field: str, where: Where, what: str) -> Sequence[Any]:
    """A non-empty list or tuple (a string is not a list of scores)."""
    if not isinstance(value, (list, tuple)):
        raise where.error(field, f"a non-empty list of {what}", value)
    if len(value) == 0:
        raise where.error(field, f"a non-empty list of {what}", value)
    return value


def check_mapping(value: Any, field: str, where: Where) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error(field, "an object (mapping of field names to values)", value)
    return value


def check_range_arg(value_range: Any, name: str) -> tuple[float, float]:
    """Validate a declared ``(low, high)`` range argument: two finite numbers with low < high."""
    ok = isinstance(value_range, (tuple, list)) and len(value_range) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value_range
    )
    if not ok or not value_range[0] < value_range[1]:
        raise ValueError(f"{name} must be a (low, high) pair of finite numbers with low < high, got {value_range!r}")
    return (float(value_range[0]), float(value_range[1]))


def check_attribute_names(attributes: Any, name: str = "attributes") -> tuple[str, ...]:
    """Validate declared attribute names: a non-empty sequence of unique, non-empty strings that
    are not ``prompt``/``response``."""
    if isinstance(attributes, str) or not isinstance(attributes, Sequence) or len(attributes) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of attribute names, got {attributes!r}")
    names = tuple(attributes)
    for a in names:
        if not isinstance(a, str) or not a:
            raise ValueError(f"{name} must contain non-empty strings, got {a!r}")
        if a in _RESERVED_ATTRIBUTE_NAMES:
            raise ValueError(f"{name} must not contain the reserved field name {a!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} must be unique, got {names!r}")
    return names


def _check_scores(scores: Any, where: Where, score_range: tuple[float, float] | None) -> tuple[float, ...]:
    check_list(scores, "scores", where, "numbers")
    return tuple(check_number(s, f"scores[{i}]", where, score_range) for i, s in enumerate(scores))


def _check_annotator_ids(ids: Any, n_scores: int, where: Where) -> tuple[str, ...] | None:
    if ids is None:
        return None
    check_list(ids, "annotator_ids", where, "strings")
    out = tuple(check_text(a, f"annotator_ids[{i}]", where) for i, a in enumerate(ids))
    if len(out) != n_scores:
        raise where.error("annotator_ids", f"one id per score ({n_scores} ids, like scores)", ids)
    seen: set[str] = set()
    for i, a in enumerate(out):
        if a in seen:  # one annotator rates one response once; a repeat is a join error upstream
            raise where.error(f"annotator_ids[{i}]", "ids unique within the row", a)
        seen.add(a)
    return out


def _check_votes(votes: Any, where: Where) -> tuple[int, ...] | None:
    if votes is None:
        return None
    check_list(votes, "votes", where, "0/1 votes")
    out = []
    for i, v in enumerate(votes):
        # bool is rejected on purpose: the schema says 0|1, and True/False usually means a
        # column of a different meaning (e.g. "is_flipped") was mapped here by mistake.
        if is_bool(v) or not isinstance(v, numbers.Integral) or v not in (0, 1):
            raise where.error(f"votes[{i}]", "0 or 1 (1 = this annotator prefers chosen)", v)
        out.append(int(v))
    return tuple(out)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RatingRecord:
    """One response rated by one or more annotators.

    ``scores``: N ≥ 1 finite ratings (N may differ between records). ``annotator_ids``: ``None``
    or N unique non-empty ids, aligned with ``scores``. Construction checks the structure (types,
    finiteness, lengths); the declared score range is checked by :func:`parse_rating`.
    """

    prompt: str
    response: str
    scores: tuple[float, ...]
    annotator_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = Where("RatingRecord")
        check_text(self.prompt, "prompt", where)
        check_text(self.response, "response", where)
        object.__setattr__(self, "scores", _check_scores(self.scores, where, None))
        object.__setattr__(self, "annotator_ids", _check_annotator_ids(self.annotator_ids, len(self.scores), where))

    def to_dict(self) -> dict[str, Any]:
        """The JSON row of this record (``annotator_ids`` omitted when ``None``)."""
        row: dict[str, Any] = {"prompt": self.prompt, "response": self.response, "scores": list(self.scores)}
        if self.annotator_ids is not None:
            row["annotator_ids"] = list(self.annotator_ids)
        return row


@dataclass(frozen=True)
class PairRecord:
    """A preference between two responses to one prompt: ``chosen`` is preferred to ``rejected``.

    ``votes``: ``None`` or n ≥ 1 binary judgments ``j_i`` (1 = annotator i prefers ``chosen``);
    ``margin``: ``None`` or a finite number ≥ 0 (a preference strength, e.g. the disagreement
    margin of the margin-regularised BT loss, ``−log σ(r_c − r_r − m)``).
    """

    prompt: str
    chosen: str
    rejected: str
    votes: tuple[int, ...] | None = None
    margin: float | None = None

    def __post_init__(self) -> None:
        where = Where("PairRecord")
        check_text(self.prompt, "prompt", where)
        check_text(self.chosen, "chosen", where)
        check_text(self.rejected, "rejected", where)
        object.__setattr__(self, "votes", _check_votes(self.votes, where))
        if self.margin is not None:
            m = check_number(self.margin, "margin", where)
            if m < 0:  # chosen is the preferred side, so its strength of preference is >= 0
                raise where.error("margin", "a number >= 0", self.margin)
            object.__setattr__(self, "margin", m)

    def vote_margin(self) -> float | None:
        """The disagreement margin of the votes, ``m = |Σ_i j_i − n/2| / (n/2)`` in [0, 1]
        (margin-regularised reward models, eq. 3): 1 when unanimous, 0 when evenly split.
        ``None`` without votes."""
        if self.votes is None:
            return None
        n = len(self.votes)
        return abs(sum(self.votes) - n / 2) / (n / 2)

    def to_dict(self) -> dict[str, Any]:
        """The JSON row of this record (``votes``/``margin`` omitted when ``None``)."""
        row: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.votes is not None:
            row["votes"] = list(self.votes)
        if self.margin is not None:
            row["margin"] = self.margin
        return row


@dataclass(frozen=True)
class AttributeRecord:
    """A response with one finite score per named attribute (``{"helpfulness": 0.75, ...}``).

    ``attributes`` keeps the declared order; it is copied into a new ``dict`` on construction
    (treat it as read-only). The declared range is checked by :func:`parse_attributes`.
    """

    prompt: str
    response: str
    attributes: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = Where("AttributeRecord")
        check_text(self.prompt, "prompt", where)
        check_text(self.response, "response", where)
        attrs = check_mapping(self.attributes, "attributes", where)
        if len(attrs) == 0:
            raise where.error("attributes", "at least one attribute", dict(attrs))
        out: dict[str, float] = {}
        for name, value in attrs.items():
            if not isinstance(name, str) or not name or name in _RESERVED_ATTRIBUTE_NAMES:
                raise where.error("attributes", "attribute names that are non-empty strings other than prompt/response", name)
            out[name] = check_number(value, name, where)
        object.__setattr__(self, "attributes", out)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON row ``{prompt, response, <attr>: value, ...}``."""
        return {"prompt": self.prompt, "response": self.response, **self.attributes}


# --------------------------------------------------------------------------- row parsers


def _row(row: Any, where: Where) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise where.error("<row>", "an object (mapping of field names to values)", row)
    return row


def parse_rating(row: Any, *, score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
                 where: Where = Where()) -> RatingRecord:
    """Validate a ratings row against the schema and ``score_range`` (closed) and build the record."""
    r = _row(row, where)
    prompt = check_text(r.get("prompt"), "prompt", where)
    response = check_text(r.get("response"), "response", where)
    scores = _check_scores(r.get("scores"), where, score_range)
    ids = _check_annotator_ids(r.get("annotator_ids"), len(scores), where)
    return RatingRecord(prompt, response, scores, ids)


def parse_pair(row: Any, *, where: Where = Where()) -> PairRecord:
    """Validate a pairs row against the schema and build the record."""
    r = _row(row, where)
    prompt = check_text(r.get("prompt"), "prompt", where)
    chosen = check_text(r.get("chosen"), "chosen", where)
    rejected = check_text(r.get("rejected"), "rejected", where)
    votes = _check_votes(r.get("votes"), where)
    margin = r.get("margin")
    if margin is not None:
        margin = check_number(margin, "margin", where)
        if margin < 0:
            raise where.error("margin", "a number >= 0", r.get("margin"))
    return PairRecord(prompt, chosen, rejected, votes, margin)


def parse_attributes(row: Any, *, attributes: Sequence[str], attr_range: tuple[float, float] = DEFAULT_ATTR_RANGE,
                     where: Where = Where()) -> AttributeRecord:
    """Validate an attributes row: every declared attribute present, finite and in ``attr_range``
    (closed); undeclared columns are ignored."""
    r = _row(row, where)
    prompt = check_text(r.get("prompt"), "prompt", where)
    response = check_text(r.get("response"), "response", where)
    values = {a: check_number(r.get(a), a, where, attr_range) for a in attributes}
    return AttributeRecord(prompt, response, values)
