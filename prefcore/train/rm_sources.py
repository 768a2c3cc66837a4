"""Where reward-model training data comes from: the embedded synthetic population (features
given), or JSONL/Parquet files of ratings, attributes or pairs whose texts are embedded once by a
frozen local backbone (features cached under ``OUT/features/<part>``, resumable).

A response is embedded as ``prompt + "\\n\\n" + response`` and a prompt (for the gating network)
as the prompt alone, pooled at the last token (:func:`prefcore.train.features.extract_features`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from prefcore.train.rm_data import PairsData, RatingsData, RMData


def response_text(prompt: str, response: str) -> str:
    return f"{prompt}\n\n{response}"


class TextEmbedder:
    """Embeds texts with a frozen local backbone, caching each named part under ``cache_dir``."""

    def __init__(self, backbone_path: str, cache_dir: str, *, max_length: int, batch_size: int):
        from transformers import AutoTokenizer

        from prefcore.models import load_backbone

        if not os.path.isdir(backbone_path):
            raise FileNotFoundError(f"backbone must be a local directory with a transformers model, got {backbone_path!r}")
        self.backbone = load_backbone(backbone_path, None).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(backbone_path, local_files_only=True)
        self.cache_dir, self.max_length, self.batch_size = cache_dir, max_length, batch_size

    def __call__(self, name: str, texts: Sequence[str]) -> torch.Tensor:
        from prefcore.train.features import extract_features, load_features

        out = os.path.join(self.cache_dir, name)
        extract_features(self.backbone, self.tokenizer, list(texts), out, batch_size=self.batch_size,
                         max_length=self.max_length)
        return load_features(out)


def _file_kind(path: str, attributes: str | None) -> str:
    from prefcore.data import read_rows

    if attributes:
        return "attributes"
    _, rows = read_rows(path)
    if rows and "chosen" in rows[0]:
        return "pairs"
    if rows and "scores" in rows[0]:
        return "ratings"
    raise ValueError(f"data {path!r}: cannot tell the schema from its first row (expected a 'scores' column for "
                     f"ratings or 'chosen'/'rejected' for pairs; pass --attributes for attribute records)")


def _ratings_from_file(path: str, cfg, embed: TextEmbedder) -> RatingsData:
    from prefcore.data import load_attributes, load_ratings

    if cfg.attributes:
        names = tuple(a.strip() for a in cfg.attributes.split(",") if a.strip())
        ds = load_attributes(path, attributes=list(names), attr_range=cfg.range, skip_invalid=cfg.skip_invalid)
        scores = ds.attributes_tensor().unsqueeze(-1)  # (B, M, 1): one score per attribute
        mask = torch.ones_like(scores, dtype=torch.bool)
    else:
        names = ("score",)
        ds = load_ratings(path, score_range=cfg.range, skip_invalid=cfg.skip_invalid)
        s, m = ds.scores_tensor()
        scores, mask = s.unsqueeze(1), m.unsqueeze(1)
    _report_skipped(path, ds)
    records = ds.records
    feats = embed("ratings-responses", [response_text(r.prompt, r.response) for r in records])
    prompts = embed("ratings-prompts", [r.prompt for r in records])
    return RatingsData(feats, scores, mask, names, prompt_features=prompts)


def _pairs_from_file(path: str, cfg, embed: TextEmbedder) -> PairsData:
    from prefcore.data import load_pairs

    ds = load_pairs(path, skip_invalid=cfg.skip_invalid)
    _report_skipped(path, ds)
    recs = ds.records
    chosen = embed("pairs-chosen", [response_text(r.prompt, r.chosen) for r in recs])
    rejected = embed("pairs-rejected", [response_text(r.prompt, r.rejected) for r in recs])
    prompt = embed("pairs-prompts", [r.prompt for r in recs])
    votes = mask = None
    if any(r.votes for r in recs):
        votes, mask = ds.votes_tensor()
    return PairsData(chosen, rejected, prompt, votes, mask)


def _report_skipped(path: str, ds) -> None:
    if ds.num_skipped:
        print(f"{path}: skipped {ds.num_skipped} invalid rows (first: {ds.skipped_errors[:1]})")


def load_rm_data(cfg) -> RMData:
    """The training data named by ``cfg`` (a :class:`~prefcore.train.reward_model.TrainRMConfig`)."""
    if cfg.data == "synthetic":
        from prefcore.train.rm_synthetic import synthetic_rm_data

        return synthetic_rm_data(cfg)
    if not os.path.exists(cfg.data):
        raise FileNotFoundError(f"data must be 'synthetic' or an existing JSONL/Parquet file, got {cfg.data!r}")
    if cfg.backbone is None:
        raise ValueError("text data needs --backbone: a local directory with a transformers model to embed the texts")
    embed = TextEmbedder(cfg.backbone, os.path.join(cfg.out, "features"), max_length=cfg.max_length,
                         batch_size=cfg.feature_batch_size)
    kind = _file_kind(cfg.data, cfg.attributes)
    if kind == "pairs":
        if cfg.method not in ("bt", "bt-margin"):
            raise ValueError(f"method {cfg.method!r} trains on ratings/attributes, but {cfg.data!r} holds pairs")
        return RMData(pairs=_pairs_from_file(cfg.data, cfg, embed))
    if cfg.method in ("bt", "bt-margin"):
        raise ValueError(f"method {cfg.method!r} trains on pairs, but {cfg.data!r} holds {kind}")
    ratings = _ratings_from_file(cfg.data, cfg, embed)
    pairs = None
    if cfg.method == "qrm":
        if cfg.pairs is None:
            raise ValueError("method 'qrm' needs --pairs (a pairs file) for its gating stage")
        pairs = _pairs_from_file(cfg.pairs, cfg, embed)
    return RMData(ratings=ratings, pairs=pairs)
