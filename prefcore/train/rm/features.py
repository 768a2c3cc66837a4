"""Feature cache for frozen backbones (as QRM does): pooled features of many texts, on disk.

A frozen backbone's features never change, so heads and gates are trained on features computed
once. :func:`extract_features` writes them as safetensors shards plus a JSON index::

    out_dir/
      index.json               what was extracted (fingerprint) and which shards are complete
      shard-00000.safetensors  tensor "features" (rows, D): texts [0, shard_size)
      shard-00001.safetensors  texts [shard_size, 2·shard_size), …

Shard ``s`` always covers texts ``[s·shard_size, (s+1)·shard_size)`` and is batched from its own
start, so it is computed identically in every run. Each shard is written atomically and only
then recorded in the index (with its SHA-256), also atomically. Re-running after an
interruption therefore keeps every recorded, intact shard and recomputes the rest; the result
is bit-for-bit the uninterrupted one when ``batch_size`` is unchanged (with a different
``batch_size`` it equals it up to floating-point rounding, since pooling does not depend on the
batch). Re-running with different texts, backbone config, tokenizer, ``shard_size``,
``max_length``, ``pooling`` or ``dtype`` is refused (the fingerprint in the index differs).
Limit: the fingerprint holds the backbone's config, not its weights.

Under ``torchrun`` (an initialised ``torch.distributed`` group), the ranks split the shards of one
cache — rank ``r`` computes shards ``r, r + W, r + 2W, …`` — and record each finished shard in
``index.rank<r>.json`` beside the index; only rank 0 writes ``index.json``, merging those records
at the end (and, when resuming, at the start: shards any rank finished before an interruption are
kept). Every shard is computed exactly as in one process, so with the same threads per process the
cache is bit-identical to the one-process cache, index included.

Texts are plain strings: pass ``prompt + response`` texts for reward features, or prompts alone
for the gating network's features (format them with the chat template first if you use one).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from prefcore.models._checks import require_int
from prefcore._io import atomic_save_safetensors, atomic_write_json, sha256_file, sha256_strings
from prefcore.models.pooling import POOLINGS, pooled_features
from prefcore.models.reward_model import backbone_hidden_size
from prefcore.ops._checks import FLOATING, require_choice

INDEX_NAME = "index.json"
FEATURES_KEY = "features"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class FeatureIndex:
    """What :func:`extract_features` produced: ``num_texts`` rows of ``hidden_size`` features in
    ``num_shards`` shards under ``out_dir``; ``computed`` shards were computed by this call (the
    others were kept from an earlier, interrupted run)."""

    out_dir: Path
    num_texts: int
    hidden_size: int | None
    num_shards: int
    computed: tuple[int, ...]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        # truncation/padding are call-time state the tokenizer keeps from its last call, not part of
        # what it produces for a given max_length; leave them out so a used tokenizer still matches
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "truncation_side", None)])
    return hashlib.sha256((text + extra).encode("utf-8")).hexdigest()


def _backbone_fingerprint(backbone: nn.Module) -> str:
    config = getattr(backbone, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else type(backbone).__name__
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _pad_right(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → ``input_ids (B, T)`` and bool ``attention_mask (B, T)``; pad id 0 (masked,
    so its value is irrelevant and the tokenizer needs no pad token)."""
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def _backbone_device(backbone: nn.Module) -> torch.device:
    for p in backbone.parameters():
        return p.device
    return torch.device("cpu")


def _compute_shard(backbone: nn.Module, tokenizer: Any, texts: Sequence[str], start: int, *, batch_size: int,
                   max_length: int, pooling: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = []
    for b in range(0, len(texts), batch_size):
        batch = list(texts[b : b + batch_size])
        enc = tokenizer(batch, truncation=True, max_length=max_length, padding=False)
        rows = [list(r) for r in enc["input_ids"]]
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"texts[{start + b + i}] tokenizes to zero tokens; there is nothing to pool")
        ids, mask = _pad_right(rows, device)
        out.append(pooled_features(backbone, ids, mask, pooling).to(device="cpu", dtype=dtype))
    return torch.cat(out)


@torch.no_grad()
def embed_texts(backbone: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8,
                max_length: int = 1024, pooling: str = "last", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pooled features ``(len(texts), D)`` of ``texts``, computed exactly as :func:`extract_features`
    does for one shard (no cache): for scoring new texts with heads trained on cached features."""
    if not texts:
        raise ValueError("texts must not be empty")
    return _compute_shard(backbone, tokenizer, list(texts), 0, batch_size=batch_size, max_length=max_length,
                          pooling=pooling, dtype=dtype, device=_backbone_device(backbone))


def _shard_ok(path: Path, entry: dict[str, Any]) -> bool:
    return path.is_file() and sha256_file(path) == entry.get("sha256")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _rank_entries_name(rank: int) -> str:
    return f"index.rank{rank}.json"


def _fingerprint_diff(index_path: Path, fingerprint: dict[str, Any]) -> list[str]:
    with open(index_path, encoding="utf-8") as f:
        old = json.load(f).get("fingerprint", {})
    return sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))


def _merge_rank_entries(root: Path) -> dict[str, Any]:
    """Rank 0: move the shard entries other ranks recorded in ``index.rank<r>.json`` into the index
    (those whose shard file matches its hash), write the index atomically, delete the rank files."""
    index_path = root / INDEX_NAME
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    rank_files = sorted(root.glob("index.rank*.json"))
    for rf in rank_files:
        with open(rf, encoding="utf-8") as f:
            for s, entry in json.load(f).items():
                if _shard_ok(root / entry["file"], entry):
                    index["shards"][s] = entry
    index["shards"] = dict(sorted(index["shards"].items(), key=lambda kv: int(kv[0])))
    index["complete"] = len(index["shards"]) == index["num_shards"]
    atomic_write_json(index_path, index)
    for rf in rank_files:
        rf.unlink()
    return index


def extract_features(backbone: nn.Module, tokenizer: Any, texts: Sequence[str], out_dir: str | os.PathLike[str], *,
                     batch_size: int = 8, shard_size: int = 4096, max_length: int = 1024, pooling: str = "last",
                     dtype: torch.dtype = torch.float32) -> FeatureIndex:
    """Pooled backbone features of ``texts`` into ``out_dir`` (resumable; see the module docstring).

    ``backbone``: a transformers model (``AutoModel``; run in eval mode under
    ``torch.inference_mode`` on its own device, its mode restored afterwards). ``tokenizer``: a
    transformers tokenizer; texts are truncated to ``max_length`` tokens (on the tokenizer's
    ``truncation_side``) with its special tokens, and padded here, so no pad token is needed.
    ``pooling``: ``"last"`` or ``"mean"`` as in :func:`prefcore.models.pooled_features`.
    Features are stored as ``dtype`` (default float32), one ``(rows, D)`` tensor per shard.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module (a transformers model), got {type(backbone).__name__}")
    require_int(batch_size, "batch_size", min_value=1)
    require_int(shard_size, "shard_size", min_value=1)
    require_int(max_length, "max_length", min_value=1)
    require_choice(pooling, "pooling", POOLINGS)
    if dtype not in FLOATING:
        raise ValueError(f"dtype must be one of {FLOATING}, got {dtype}")

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(texts) // shard_size)
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "num_texts": len(texts),
        "texts_sha256": sha256_strings(texts),
        "shard_size": shard_size,
        "max_length": max_length,
        "pooling": pooling,
        "dtype": str(dtype).removeprefix("torch."),
        "hidden_size": backbone_hidden_size(backbone),
        "backbone_class": type(getattr(backbone, "base_model", backbone)).__name__,
        "backbone_config_sha256": _backbone_fingerprint(backbone),
        "tokenizer_sha256": _tokenizer_fingerprint(tokenizer),
    }
    index_path = root / INDEX_NAME
    from prefcore.train.distributed import world as dist_world

    rank, world = dist_world()
    if rank == 0:
        if not index_path.is_file():
            atomic_write_json(index_path, {"fingerprint": fingerprint, "num_shards": num_shards, "shards": {},
                                           "complete": num_shards == 0})
        elif _fingerprint_diff(index_path, fingerprint) == []:
            _merge_rank_entries(root)  # shards other ranks finished before an interruption
    _barrier(world)
    differ = _fingerprint_diff(index_path, fingerprint)  # every rank checks, so all raise together
    if differ:
        raise ValueError(
            f"{index_path} was written for a different extraction (differs in {differ}); "
            "use a new out_dir or delete the old one"
        )
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)

    device = _backbone_device(backbone)
    was_training = backbone.training
    backbone.eval()
    computed: list[int] = []
    mine: dict[str, dict] = {}
    try:
        with torch.inference_mode():
            for s in range(rank, num_shards, world):  # ranks take every world-th shard
                entry = index["shards"].get(str(s))
                path = root / shard_name(s)
                if entry is not None and _shard_ok(path, entry):
                    continue
                start, stop = s * shard_size, min((s + 1) * shard_size, len(texts))
                feats = _compute_shard(backbone, tokenizer, texts[start:stop], start, batch_size=batch_size,
                                       max_length=max_length, pooling=pooling, dtype=dtype, device=device)
                # one metadata key: safetensors writes several in hash-map order, which differs between
                # processes, and the bytes (hashed into the index) must not
                atomic_save_safetensors(path, {FEATURES_KEY: feats}, metadata={"rows": f"{start}:{stop}"})
                entry = {"file": path.name, "start": start, "stop": stop, "rows": stop - start,
                         "hidden_size": int(feats.shape[1]), "batch_size": batch_size, "sha256": sha256_file(path)}
                if world == 1:
                    index["shards"][str(s)] = entry
                    index["complete"] = len(index["shards"]) == num_shards
                    atomic_write_json(index_path, index)
                else:  # only rank 0 writes the index; the others record their shards beside it
                    mine[str(s)] = entry
                    atomic_write_json(root / _rank_entries_name(rank), mine)
                computed.append(s)
    finally:
        backbone.train(was_training)
    if world > 1:
        _barrier(world)
        if rank == 0:
            index = _merge_rank_entries(root)
        _barrier(world)
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    hidden = fingerprint["hidden_size"]
    if hidden is None and index["shards"]:
        hidden = next(iter(index["shards"].values()))["hidden_size"]
    return FeatureIndex(root, len(texts), hidden, num_shards, tuple(computed))


def load_features(out_dir: str | os.PathLike[str], *, verify: bool = True) -> torch.Tensor:
    """All features written by :func:`extract_features`, in text order: ``(N, D)``.

    Raises ``ValueError`` if the extraction is incomplete (re-run :func:`extract_features` to
    finish it) or, with ``verify``, if a shard's bytes differ from the hash in the index."""
    root = Path(out_dir)
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        raise ValueError(f"{str(out_dir)!r} holds no feature cache: {INDEX_NAME} not found")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    fp = index["fingerprint"]
    missing = [s for s in range(index["num_shards"]) if str(s) not in index["shards"]]
    if missing:
        raise ValueError(f"feature extraction in {str(out_dir)!r} is incomplete: shards {missing[:8]} of "
                         f"{index['num_shards']} missing; re-run extract_features with the same arguments to resume")
    parts = []
    for s in range(index["num_shards"]):
        entry = index["shards"][str(s)]
        path = root / entry["file"]
        if not path.is_file() or (verify and sha256_file(path) != entry["sha256"]):
            raise ValueError(f"shard {path} is missing or does not match the hash in {INDEX_NAME}; "
                             "delete it and re-run extract_features to recompute it")
        feats = load_file(str(path))[FEATURES_KEY]
        if feats.shape[0] != entry["rows"]:
            raise ValueError(f"shard {path} has {feats.shape[0]} rows, the index says {entry['rows']}")
        parts.append(feats)
    if not parts:
        return torch.empty(0, fp.get("hidden_size") or 0, dtype=getattr(torch, fp["dtype"]))
    return torch.cat(parts)
