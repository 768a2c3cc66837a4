"""Where reward-model training data comes from: the embedded synthetic population (features
given), or JSONL/Parquet files whose texts are embedded once by a frozen local backbone
(features cached under ``OUT/features/<part>``, resumable).

Files are read in prefcore's own schemas (``--data_format prefcore``: ratings, pairs, or
attributes with ``--attributes``) or in a public source's column layout through the adapters
of :mod:`prefcore.data` (``helpsteer2`` → attributes on [0, 1], ``ultrafeedback`` → ratings,
``ultrafeedback-binarized`` and ``hh-rlhf`` → pairs, ``multi-annotator`` → ratings mapped from
``--score_range`` to [−1, 1]).

A response is embedded as ``prompt + "\\n\\n" + response`` and a prompt (for the gating network)
as the prompt alone, pooled at the last token; over-long texts are truncated from the left, so
the pooled token is always the true end of the response.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from prefcore.train.rm.data import PairsData, RatingsData, RMData, held_out_count

DATA_FORMATS = ("prefcore", "helpsteer2", "ultrafeedback", "ultrafeedback-binarized", "hh-rlhf", "multi-annotator")
PAIR_FORMATS = ("prefcore", "ultrafeedback-binarized", "hh-rlhf")


def response_text(prompt: str, response: str) -> str:
    return f"{prompt}\n\n{response}"


def load_text_encoder(backbone_path: str, device: str = "cpu"):
    """``(backbone, tokenizer)`` from a local directory, the backbone in eval mode on ``device`` and
    the tokenizer truncating from the left (keep the end: last-token pooling reads it)."""
    from transformers import AutoTokenizer

    from prefcore.models import load_backbone

    if not os.path.isdir(backbone_path):
        raise FileNotFoundError(f"backbone must be a local directory with a transformers model, got {backbone_path!r}")
    check_backbone_config(backbone_path)
    tokenizer = AutoTokenizer.from_pretrained(backbone_path, local_files_only=True)
    tokenizer.truncation_side = "left"
    return load_backbone(backbone_path).to(device).eval(), tokenizer


def check_backbone_config(backbone_path: str) -> None:
    """Parse ``backbone_path/config.json`` as transformers will, turning what is wrong with it (not
    JSON, an unknown model type, a field of the wrong type) into one ``ValueError`` naming the file."""
    import json

    from transformers import AutoConfig

    path = os.path.join(backbone_path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone {backbone_path!r} has no config.json (save the model with save_pretrained)")
    try:
        AutoConfig.from_pretrained(backbone_path, local_files_only=True)
    except json.JSONDecodeError as exc:
        raise ValueError(f"backbone config {path!r}, line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    except Exception as exc:  # transformers/huggingface_hub raise many types for a bad config
        text = " ".join(str(exc).split())
        raise ValueError(f"backbone config {path!r} is invalid: {text}") from None


class TextEmbedder:
    """Embeds texts with a frozen local backbone on ``device``, caching each named part under ``cache_dir``."""

    def __init__(self, backbone_path: str, cache_dir: str, *, max_length: int, batch_size: int, device: str = "cpu",
                 shard_size: int = 4096):
        self.backbone, self.tokenizer = load_text_encoder(backbone_path, device)
        self.cache_dir, self.max_length, self.batch_size = cache_dir, max_length, batch_size
        self.shard_size = shard_size

    def __call__(self, name: str, texts: Sequence[str]) -> torch.Tensor:
        from prefcore.train.rm.features import extract_features, load_features

        out = os.path.join(self.cache_dir, name)
        extract_features(self.backbone, self.tokenizer, list(texts), out, batch_size=self.batch_size,
                         max_length=self.max_length, shard_size=self.shard_size)
        return load_features(out).float().cpu()


def _kind(path: str, fmt: str, attributes: str | None) -> str:
    """'ratings', 'attributes' or 'pairs' for a file in format ``fmt``."""
    from prefcore.data import read_rows

    fixed = {"helpsteer2": "attributes", "ultrafeedback": "ratings", "multi-annotator": "ratings",
             "ultrafeedback-binarized": "pairs", "hh-rlhf": "pairs"}
    if fmt in fixed:
        return fixed[fmt]
    if attributes:
        return "attributes"
    _, rows = read_rows(path)
    if rows and "chosen" in rows[0]:
        return "pairs"
    if rows and "scores" in rows[0]:
        return "ratings"
    raise ValueError(f"data {path!r}: cannot tell the schema from its first row (expected a 'scores' column for "
                     f"ratings or 'chosen'/'rejected' for pairs; pass --attributes for attribute records, or "
                     f"--data_format for a public source's layout)")


def _load(path: str, fmt: str, kind: str, cfg):
    """The validated :mod:`prefcore.data` collection of ``path``."""
    import prefcore.data as pd

    skip = cfg.skip_invalid
    if fmt == "helpsteer2":
        ds = pd.load_helpsteer2(path, skip_invalid=skip)
    elif fmt == "ultrafeedback":
        ds = pd.load_ultrafeedback_ratings(path, skip_invalid=skip)
    elif fmt == "multi-annotator":
        ds = pd.load_multi_annotator(path, source_range=cfg.range, skip_invalid=skip)
    elif fmt == "ultrafeedback-binarized":
        ds = pd.load_ultrafeedback_binarized(path, with_margin=True, skip_invalid=skip)
    elif fmt == "hh-rlhf":
        ds = pd.load_hh_rlhf(path, skip_invalid=skip)
    elif kind == "attributes":
        names = [a.strip() for a in cfg.attributes.split(",") if a.strip()]
        ds = pd.load_attributes(path, attributes=names, attr_range=cfg.range, skip_invalid=skip)
    elif kind == "ratings":
        ds = pd.load_ratings(path, score_range=cfg.range, skip_invalid=skip)
    else:
        ds = pd.load_pairs(path, skip_invalid=skip)
    if ds.num_skipped:
        print(f"{path}: skipped {ds.num_skipped} invalid rows (first: {ds.skipped_errors[:1]})")
    if len(ds) == 0:
        raise ValueError(f"data {path!r} holds no valid {kind} records")
    # the train/held-out split must work before a single text is embedded (an expensive step)
    held_out_count(len(ds), cfg.eval_fraction, "pairs" if kind == "pairs" else "ratings", source=path)
    return ds


def ratings_tensors(ds, kind: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """``(scores (N, M, S), mask (N, M, S) bool, attribute names)`` of a ratings or attributes set."""
    if kind == "attributes":
        scores = ds.attributes_tensor().unsqueeze(-1)  # (B, M, 1): one score per attribute
        return scores, torch.ones_like(scores, dtype=torch.bool), tuple(ds.attributes)
    s, m = ds.scores_tensor()
    return s.unsqueeze(1), m.unsqueeze(1), ("score",)


def _ratings(ds, kind: str, embed: TextEmbedder, with_prompts: bool) -> RatingsData:
    scores, mask, names = ratings_tensors(ds, kind)
    recs = ds.records
    feats = embed("ratings-responses", [response_text(r.prompt, r.response) for r in recs])
    prompts = embed("ratings-prompts", [r.prompt for r in recs]) if with_prompts else None
    return RatingsData(feats, scores, mask, names, prompt_features=prompts)


def _pairs(ds, path: str, embed: TextEmbedder, *, with_prompts: bool, need_margin: bool) -> PairsData:
    """Pairs with a per-pair margin: the record's ``margin`` if given, else the vote margin
    ``|Σj − n/2|/(n/2)`` of its votes, else none (an error when ``need_margin``)."""
    recs = ds.records
    margins = [r.margin if r.margin is not None else (r.vote_margin() if r.votes else None) for r in recs]
    if need_margin:
        missing = [i for i, m in enumerate(margins) if m is None]
        if missing:
            raise ValueError(f"data {path!r}: method 'bt-margin' needs votes or a margin on every pair; "
                             f"{len(missing)} have neither (first: row {missing[0]} of the valid records)")
    margin = None
    if all(m is not None for m in margins):
        margin = torch.tensor(margins, dtype=torch.float32)
    votes = vote_mask = None
    if any(r.votes for r in recs):
        votes, vote_mask = ds.votes_tensor()
    chosen = embed("pairs-chosen", [response_text(r.prompt, r.chosen) for r in recs])
    rejected = embed("pairs-rejected", [response_text(r.prompt, r.rejected) for r in recs])
    prompt = embed("pairs-prompts", [r.prompt for r in recs]) if with_prompts else None
    return PairsData(chosen, rejected, prompt, votes, vote_mask, margin)


def data_kind(cfg) -> str:
    """The kind of ``cfg.data`` (:func:`_kind`), checked against what ``cfg.method`` trains on:
    pairs for bt/bt-margin, ratings or attributes for the others."""
    kind = _kind(cfg.data, cfg.data_format, cfg.attributes)
    pairwise = cfg.method in ("bt", "bt-margin")
    if pairwise and kind != "pairs":
        raise ValueError(f"method {cfg.method!r} trains on pairs, but {cfg.data!r} holds {kind}")
    if not pairwise and kind == "pairs":
        raise ValueError(f"method {cfg.method!r} trains on ratings/attributes, but {cfg.data!r} holds pairs")
    return kind


def load_rm_data(cfg) -> RMData:
    """The training data named by ``cfg`` (a :class:`~prefcore.train.rm.trainer.TrainRMConfig`)."""
    if cfg.data == "synthetic":
        from prefcore.train.rm.synthetic import synthetic_rm_data

        return synthetic_rm_data(cfg)
    for name, path in (("data", cfg.data), ("pairs", cfg.pairs)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{name} must be 'synthetic' or an existing JSONL/Parquet file, got {path!r}"
                                    if name == "data" else f"pairs must be an existing JSONL/Parquet file, got {path!r}")
    if cfg.backbone is None:
        raise ValueError("text data needs --backbone: a local directory with a transformers model to embed the texts")
    kind = data_kind(cfg)
    pairwise = kind == "pairs"
    if cfg.method == "qrm" and cfg.pairs is None:
        raise ValueError("method 'qrm' needs --pairs (a pairs file) for its gating stage")
    ds = _load(cfg.data, cfg.data_format, kind, cfg)
    if cfg.method in ("gmm", "mean-var") and kind == "attributes" and len(ds.attributes) != 1:
        raise ValueError(f"method {cfg.method!r} models one score distribution per item, but {cfg.data!r} has "
                         f"{len(ds.attributes)} attributes {tuple(ds.attributes)}: pass one with --attributes")
    pairs_ds = None
    if cfg.method == "qrm":
        if cfg.pairs_format not in PAIR_FORMATS:
            raise ValueError(f"pairs_format must be one of {PAIR_FORMATS}, got {cfg.pairs_format!r}")
        pairs_ds = _load(cfg.pairs, cfg.pairs_format, "pairs", cfg)
    from prefcore.train.distributed import rank_device

    embed = TextEmbedder(cfg.backbone, os.path.join(cfg.out, "features"), max_length=cfg.max_length,
                         batch_size=cfg.feature_batch_size, device=rank_device(cfg.device),
                         shard_size=cfg.feature_shard_size)
    if pairwise:
        return RMData(pairs=_pairs(ds, cfg.data, embed, with_prompts=False, need_margin=cfg.method == "bt-margin"))
    ratings = _ratings(ds, kind, embed, with_prompts=cfg.method == "qrm")
    pairs = _pairs(pairs_ds, cfg.pairs, embed, with_prompts=True, need_margin=False) if pairs_ds is not None else None
    return RMData(ratings=ratings, pairs=pairs)


def data_fingerprint(cfg) -> dict[str, str]:
    """SHA-256 of the data files a run reads (stored in config.json, so ``--resume`` refuses
    changed data under the same path)."""
    from prefcore._io import sha256_file

    return {name: sha256_file(path) for name, path in (("data", cfg.data), ("pairs", cfg.pairs))
            if path is not None and path != "synthetic" and os.path.isfile(path)}
