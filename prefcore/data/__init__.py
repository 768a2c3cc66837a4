"""prefcore's data layer (DESIGN §4): the ratings / pairs / attributes schemas with row
validation, JSONL/Parquet loading through 🤗 ``datasets`` (local files only), atomic JSONL
writing, adapters from public datasets (HelpSteer2, UltraFeedback, HH-RLHF, long
multi-annotator tables), and batching for fine-tuning (truncation that keeps the response's
end, length-grouped rank-sharded batches: :mod:`prefcore.data.batching`).

``datasets`` is imported only when a file is read, so importing this package is cheap.
"""
from prefcore.data import synthetic, text_world
from prefcore.data.batching import (
    TOO_LONG,
    LengthGroupedBatchSampler,
    TruncationStats,
    collate_pairs,
    pad_rows,
    pair_length,
    truncate_example,
    truncate_pair,
)
from prefcore.data.adapters import (
    HELPSTEER2_ATTRIBUTES,
    ULTRAFEEDBACK_ASPECTS,
    helpsteer2_row,
    hh_rlhf_row,
    load_helpsteer2,
    load_hh_rlhf,
    load_multi_annotator,
    load_ultrafeedback_binarized,
    load_ultrafeedback_ratings,
    split_hh_transcript,
    ultrafeedback_binarized_row,
    ultrafeedback_rows,
)
from prefcore.data.containers import AttributesDataset, PairsDataset, RatingsDataset, RecordSet
from prefcore.data.io import load_attributes, load_pairs, load_ratings, read_rows, save_jsonl
from prefcore.data.schemas import (
    AttributeRecord,
    DataValidationError,
    PairRecord,
    RatingRecord,
    parse_attributes,
    parse_pair,
    parse_rating,
)
from prefcore.data.text_world import TextWorld, TextWorldConfig

__all__ = [
    "synthetic",
    "text_world",
    "TextWorld",
    "TextWorldConfig",
    # schemas
    "DataValidationError",
    "RatingRecord",
    "PairRecord",
    "AttributeRecord",
    "parse_rating",
    "parse_pair",
    "parse_attributes",
    # collections
    "RecordSet",
    "RatingsDataset",
    "PairsDataset",
    "AttributesDataset",
    # io
    "read_rows",
    "load_ratings",
    "load_pairs",
    "load_attributes",
    "save_jsonl",
    # adapters
    "HELPSTEER2_ATTRIBUTES",
    "ULTRAFEEDBACK_ASPECTS",
    "helpsteer2_row",
    "load_helpsteer2",
    "ultrafeedback_binarized_row",
    "load_ultrafeedback_binarized",
    "ultrafeedback_rows",
    "load_ultrafeedback_ratings",
    "split_hh_transcript",
    "hh_rlhf_row",
    "load_hh_rlhf",
    "load_multi_annotator",
    # batching
    "TOO_LONG",
    "TruncationStats",
    "truncate_example",
    "truncate_pair",
    "LengthGroupedBatchSampler",
    "pad_rows",
    "collate_pairs",
    "pair_length",
]
