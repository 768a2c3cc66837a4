"""Adapters from public preference datasets, in their own column layouts, to prefcore's schemas.

Each ``load_*`` reads a local JSONL/Parquet file (or an iterable of rows, e.g. a
``datasets.Dataset`` the caller loaded) exactly as the source publishes it, converts every row,
and validates the result; errors name the source row and the source's own field. Nothing is
downloaded. The ``*_row`` functions convert one row and are usable on their own.

Sources, the layout read, and the result:

* **HelpSteer2** (``nvidia/HelpSteer2``): ``prompt, response, helpfulness, correctness,
  coherence, complexity, verbosity`` (integers 0–4) → attributes, each ``v/4`` in [0, 1].
* **UltraFeedback, binarized** (``HuggingFaceH4/ultrafeedback_binarized``): ``prompt``,
  ``chosen``/``rejected`` (chat message lists), ``score_chosen``, ``score_rejected`` → pairs of
  the final assistant messages, optionally with a margin from the score gap.
* **UltraFeedback, raw** (``openbmb/UltraFeedback``): ``instruction``,
  ``completions[{response, annotations: {aspect: {Rating}}}]`` → ratings, one record per
  completion and one score per rated aspect, 1–5 → [−1, 1].
* **HH-RLHF** (``Anthropic/hh-rlhf``): ``chosen``, ``rejected`` (full transcripts) → pairs of
  the shared dialogue prefix and the two final assistant replies.
* **Multi-annotator long tables**: one row per (item, annotator) with item id, prompt,
  response, annotator id and score (column names configurable) → ratings grouped per item
  with ``annotator_ids``, scores mapped linearly from the declared source scale onto [−1, 1].
"""
from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from prefcore.data.containers import AttributesDataset, PairsDataset, RatingsDataset
from prefcore.data.io import RowSource, collect, read_rows
from prefcore.data.schemas import (
    AttributeRecord,
    PairRecord,
    RatingRecord,
    Where,
    check_list,
    check_mapping,
    check_number,
    check_range_arg,
    check_text,
    is_bool,
)

# --------------------------------------------------------------------------- HelpSteer2

HELPSTEER2_ATTRIBUTES: tuple[str, ...] = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
HELPSTEER2_SCALE: tuple[float, float] = (0.0, 4.0)


def helpsteer2_row(row: Any, where: Where = Where()) -> AttributeRecord:
    """One HelpSteer2 row → :class:`AttributeRecord` with each 0–4 rating divided by 4.

    The source scale is validated before normalising, so an error quotes the source value
    (``expected a number in [0, 4], got int 5``). Multi-turn prompts keep HelpSteer2's own turn
    markup (``<extra_id_1>User`` …) unchanged.
    """
    r = check_mapping(row, "<row>", where)
    prompt = check_text(r.get("prompt"), "prompt", where)
    response = check_text(r.get("response"), "response", where)
    lo, hi = HELPSTEER2_SCALE
    values = {a: (check_number(r.get(a), a, where, HELPSTEER2_SCALE) - lo) / (hi - lo) for a in HELPSTEER2_ATTRIBUTES}
    return AttributeRecord(prompt, response, values)


def load_helpsteer2(path_or_records: RowSource, *, skip_invalid: bool = False) -> AttributesDataset:
    """Load HelpSteer2 rows as attributes normalised to [0, 1] (columns :data:`HELPSTEER2_ATTRIBUTES`)."""
    source, rows = read_rows(path_or_records)
    records, report = collect(rows, source, lambda r, w: (helpsteer2_row(r, w),), skip_invalid=skip_invalid)
    return AttributesDataset(records=records, attributes=HELPSTEER2_ATTRIBUTES, attr_range=(0.0, 1.0), **report)


# --------------------------------------------------------------------------- UltraFeedback

# Binarized UltraFeedback scores: 1–10 (overall_score) in the first release, the 1–5 mean of
# the four aspect ratings later; [1, 10] holds both, pass the exact scale for margins.
ULTRAFEEDBACK_SCORE_RANGE: tuple[float, float] = (1.0, 10.0)
ULTRAFEEDBACK_ASPECTS: tuple[str, ...] = ("helpfulness", "honesty", "instruction_following", "truthfulness")
_UF_RATINGS = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5}


def _final_assistant(messages: Any, field: str, where: Where) -> tuple[str, list[tuple[Any, Any]]]:
    """The content of the last message (which must be the assistant's) and the earlier turns."""
    msgs = check_list(messages, field, where, "chat messages {role, content}")
    for i, m in enumerate(msgs):
        check_mapping(m, f"{field}[{i}]", where)
    last = msgs[-1]
    if last.get("role") != "assistant":
        raise where.error(f"{field}[{len(msgs) - 1}].role", "'assistant' (the final message is the response)", last.get("role"))
    content = check_text(last.get("content"), f"{field}[{len(msgs) - 1}].content", where)
    return content, [(m.get("role"), m.get("content")) for m in msgs[:-1]]


def ultrafeedback_binarized_row(row: Any, where: Where = Where(), *,
                                score_range: tuple[float, float] = ULTRAFEEDBACK_SCORE_RANGE,
                                with_margin: bool = False) -> PairRecord:
    """One binarized-UltraFeedback row → :class:`PairRecord`.

    ``prompt`` is the ``prompt`` column; ``chosen``/``rejected`` are the contents of the final
    (assistant) messages of the two message lists, whose earlier turns must be identical.
    ``score_chosen >= score_rejected`` is required (ties are kept: the binarized sets contain
    them). ``with_margin=True`` sets ``margin = (score_chosen − score_rejected)/(hi − lo)`` in
    [0, 1] for ``score_range = (lo, hi)``; otherwise no margin is set.
    """
    r = check_mapping(row, "<row>", where)
    prompt = check_text(r.get("prompt"), "prompt", where)
    chosen, chosen_ctx = _final_assistant(r.get("chosen"), "chosen", where)
    rejected, rejected_ctx = _final_assistant(r.get("rejected"), "rejected", where)
    if chosen_ctx != rejected_ctx:
        raise where.error("rejected", "the same conversation before the final message as chosen", r.get("rejected"))
    sc = check_number(r.get("score_chosen"), "score_chosen", where, score_range)
    sr = check_number(r.get("score_rejected"), "score_rejected", where, score_range)
    if sc < sr:
        raise where.error("score_rejected", f"<= score_chosen ({sc:g})", r.get("score_rejected"))
    margin = (sc - sr) / (score_range[1] - score_range[0]) if with_margin else None
    return PairRecord(prompt, chosen, rejected, None, margin)


def load_ultrafeedback_binarized(path_or_records: RowSource, *,
                                 score_range: tuple[float, float] = ULTRAFEEDBACK_SCORE_RANGE,
                                 with_margin: bool = False, skip_invalid: bool = False) -> PairsDataset:
    """Load binarized UltraFeedback (``HuggingFaceH4/ultrafeedback_binarized`` layout) as pairs;
    see :func:`ultrafeedback_binarized_row`."""
    score_range = check_range_arg(score_range, "score_range")
    if not isinstance(with_margin, bool):
        raise TypeError(f"with_margin must be a bool, got {type(with_margin).__name__}")
    source, rows = read_rows(path_or_records)
    records, report = collect(
        rows, source,
        lambda r, w: (ultrafeedback_binarized_row(r, w, score_range=score_range, with_margin=with_margin),),
        skip_invalid=skip_invalid)
    return PairsDataset(records=records, **report)


def _uf_rating(annotation: Any, field: str, where: Where) -> int | None:
    """An aspect's 1–5 rating (``None`` for ``"N/A"``). The aspect value is ``{"Rating": "4", ...}``
    (Hub layout) or a one-element list of it (the layout of the original release)."""
    if isinstance(annotation, (list, tuple)):
        if len(annotation) != 1:
            raise where.error(field, "one annotation (an object, or a list holding one)", annotation)
        field, annotation = f"{field}[0]", annotation[0]
    a = check_mapping(annotation, field, where)
    rating = a.get("Rating")
    if rating == "N/A":
        return None
    if isinstance(rating, str) and rating.strip() in _UF_RATINGS:
        return _UF_RATINGS[rating.strip()]
    if isinstance(rating, int) and not isinstance(rating, bool) and 1 <= rating <= 5:
        return rating
    raise where.error(f"{field}.Rating", "a rating '1'..'5' or 'N/A'", rating)


def ultrafeedback_rows(row: Any, where: Where = Where(), *,
                       aspects: Sequence[str] = ULTRAFEEDBACK_ASPECTS) -> list[RatingRecord]:
    """One raw-UltraFeedback row (an instruction and its completions) → one
    :class:`RatingRecord` per completion.

    Each rated aspect is one score, ``(rating − 3)/2`` mapping the 1–5 scale onto [−1, 1], with
    the aspect's name as its annotator id (GPT-4 judged each aspect separately, so the aspects
    play the role of raters that look at different qualities). ``"N/A"`` ratings are left out;
    a completion with no rating at all makes the row invalid. The critique-model
    ``overall_score`` and ``fine-grained_score`` are not used.
    """
    r = check_mapping(row, "<row>", where)
    prompt = check_text(r.get("instruction"), "instruction", where)
    completions = check_list(r.get("completions"), "completions", where, "completions")
    out = []
    for j, c in enumerate(completions):
        base = f"completions[{j}]"
        c = check_mapping(c, base, where)
        response = check_text(c.get("response"), f"{base}.response", where)
        annotations = check_mapping(c.get("annotations"), f"{base}.annotations", where)
        scores, ids = [], []
        for aspect in aspects:
            rating = _uf_rating(annotations.get(aspect), f"{base}.annotations.{aspect}", where)
            if rating is not None:
                scores.append((rating - 3) / 2)
                ids.append(aspect)
        if not scores:
            raise where.error(f"{base}.annotations", f"at least one rated aspect of {tuple(aspects)}", "all 'N/A'")
        out.append(RatingRecord(prompt, response, tuple(scores), tuple(ids)))
    return out


def load_ultrafeedback_ratings(path_or_records: RowSource, *, aspects: Sequence[str] = ULTRAFEEDBACK_ASPECTS,
                               skip_invalid: bool = False) -> RatingsDataset:
    """Load raw UltraFeedback (``openbmb/UltraFeedback`` layout) as ratings on [−1, 1]; see
    :func:`ultrafeedback_rows`. A bad row skips all of its completions."""
    if isinstance(aspects, str) or not aspects or not all(a in ULTRAFEEDBACK_ASPECTS for a in aspects) \
            or len(set(aspects)) != len(aspects):
        raise ValueError(f"aspects must be a non-empty subset of {ULTRAFEEDBACK_ASPECTS} without repeats, got {aspects!r}")
    aspects = tuple(aspects)
    source, rows = read_rows(path_or_records)
    records, report = collect(rows, source, lambda r, w: ultrafeedback_rows(r, w, aspects=aspects),
                              skip_invalid=skip_invalid)
    return RatingsDataset(records=records, score_range=(-1.0, 1.0), **report)


# --------------------------------------------------------------------------- HH-RLHF

HH_ASSISTANT = "\n\nAssistant:"


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript ``"\\n\\nHuman: …\\n\\nAssistant: …"`` at its last
    ``"\\n\\nAssistant:"``: the prefix up to and including that marker (the dialogue so far, in
    HH's own markup) and the final reply with surrounding whitespace stripped.
    Raises ``ValueError`` if the marker is absent."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    i = text.rfind(HH_ASSISTANT)
    if i < 0:
        raise ValueError(f"text has no {HH_ASSISTANT!r} turn")
    cut = i + len(HH_ASSISTANT)
    return text[:cut], text[cut:].strip()


def hh_rlhf_row(row: Any, where: Where = Where()) -> PairRecord:
    """One HH-RLHF row ``{chosen, rejected}`` (two full transcripts) → :class:`PairRecord`.

    Both transcripts must share the dialogue before the final assistant reply; that prefix is
    the prompt and the two final replies are ``chosen``/``rejected``. An empty final reply is
    an invalid row (HH-RLHF contains a few).
    """
    r = check_mapping(row, "<row>", where)
    parts = {}
    for side in ("chosen", "rejected"):
        text = check_text(r.get(side), side, where)
        if HH_ASSISTANT not in text:
            raise where.error(side, f"a transcript with a final {HH_ASSISTANT!r} turn", text)
        parts[side] = split_hh_transcript(text)
        if not parts[side][1]:
            raise where.error(side, "a non-empty final assistant reply", text)
    (prompt, chosen), (prompt_r, rejected) = parts["chosen"], parts["rejected"]
    if prompt != prompt_r:
        raise where.error("rejected", "the same dialogue before the final assistant reply as chosen", r.get("rejected"))
    return PairRecord(prompt, chosen, rejected)


def load_hh_rlhf(path_or_records: RowSource, *, skip_invalid: bool = False) -> PairsDataset:
    """Load HH-RLHF (``Anthropic/hh-rlhf`` layout) as pairs; see :func:`hh_rlhf_row`."""
    source, rows = read_rows(path_or_records)
    records, report = collect(rows, source, lambda r, w: (hh_rlhf_row(r, w),), skip_invalid=skip_invalid)
    return PairsDataset(records=records, **report)


# --------------------------------------------------------------------------- multi-annotator


@dataclass
class _Item:
    prompt: str
    response: str
    first_row: int
    scores: list[float]
    annotator_ids: list[str]


def _annotator_id(value: Any, field: str, where: Where) -> str:
    # Integer ids are common in crowd-sourcing exports; they are stored as their decimal text.
    if isinstance(value, numbers.Integral) and not is_bool(value):
        return str(int(value))
    return check_text(value, field, where)


def load_multi_annotator(path_or_records: RowSource, *, source_range: tuple[float, float],
                         item_key: str | None = "item_id", prompt_key: str = "prompt",
                         response_key: str = "response", annotator_key: str = "annotator_id",
                         score_key: str = "score", skip_invalid: bool = False) -> RatingsDataset:
    """Group a long multi-annotator table (one row per (item, annotator)) into ratings.

    Rows with the same ``item_key`` value (or, with ``item_key=None``, the same
    (prompt, response)) form one :class:`RatingRecord`; items keep the order of their first row
    and scores the order of their rows. Scores on the source scale ``source_range = (lo, hi)``
    (closed) are mapped linearly onto [−1, 1]: ``2·(s − lo)/(hi − lo) − 1``. Annotator ids may be
    strings or integers (stored as text). A row whose prompt/response differs from its item's
    first row, or that repeats an annotator of its item, is invalid. With ``skip_invalid=True``
    only the bad rows are dropped (their item keeps its other ratings); ``num_skipped`` counts
    source rows.
    """
    lo, hi = check_range_arg(source_range, "source_range")
    keys = {"prompt_key": prompt_key, "response_key": response_key, "annotator_key": annotator_key, "score_key": score_key}
    if item_key is not None:
        keys["item_key"] = item_key
    for name, key in keys.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} must be a non-empty column name, got {key!r}")
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"column names must be distinct, got {keys!r}")
    source, rows = read_rows(path_or_records)
    items: dict[Hashable, _Item] = {}

    def parse(row: Any, where: Where) -> tuple[()]:
        # Validate the whole row before touching `items`, so a skipped row leaves no trace.
        r = check_mapping(row, "<row>", where)
        prompt = check_text(r.get(prompt_key), prompt_key, where)
        response = check_text(r.get(response_key), response_key, where)
        if item_key is None:
            key: Hashable = (prompt, response)
        else:
            key = r.get(item_key)
            if is_bool(key) or not isinstance(key, (str, numbers.Integral)) or (isinstance(key, str) and not key.strip()):
                raise where.error(item_key, "an item id (non-empty string or integer)", key)
            if not isinstance(key, str):
                key = int(key)  # NumPy and Python integers of equal value are one item
        annotator = _annotator_id(r.get(annotator_key), annotator_key, where)
        score = check_number(r.get(score_key), score_key, where, (lo, hi))
        item = items.get(key)
        if item is not None:
            if (prompt, response) != (item.prompt, item.response):
                field = prompt_key if prompt != item.prompt else response_key
                raise where.error(field, f"the same {field} as row {item.first_row} of item {key!r}", r.get(field))
            if annotator in item.annotator_ids:
                raise where.error(annotator_key, f"one rating per annotator per item ({annotator!r} already rated item {key!r})", r.get(annotator_key))
        else:
            item = items[key] = _Item(prompt, response, where.row if where.row is not None else -1, [], [])
        item.scores.append(2.0 * (score - lo) / (hi - lo) - 1.0)
        item.annotator_ids.append(annotator)
        return ()

    _, report = collect(rows, source, parse, skip_invalid=skip_invalid)
    records = tuple(RatingRecord(it.prompt, it.response, tuple(it.scores), tuple(it.annotator_ids)) for it in items.values())
    return RatingsDataset(records=records, score_range=(-1.0, 1.0), **report)
