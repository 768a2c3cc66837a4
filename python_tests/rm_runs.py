"""Tiny text reward-model runs for the RM directory / export / scoring tests: a random Llama
backbone and word-level tokenizer (``tiny_transformers``), the synthetic ratings world as JSONL
ratings and vote pairs, and ``prefcore train-rm`` on them (a few steps, linear heads)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prefcore.cli import main


@dataclass(frozen=True)
class TextWorld:
    backbone: Path
    ratings: Path
    pairs: Path
    records: list[dict]


def text_world(root: Path, num_items: int = 40) -> TextWorld:
    from prefcore.data import save_jsonl
    from prefcore.data.synthetic import RatingsWorldConfig, make_ratings_world, sample_vote_pairs
    from python_tests.tiny_transformers import make_llama, make_tokenizer

    backbone = root / "backbone"
    make_llama(backbone)
    make_tokenizer(backbone)
    world = make_ratings_world(torch.Generator().manual_seed(1), RatingsWorldConfig(num_items=num_items))
    records = world.to_records()
    save_jsonl(records, root / "ratings.jsonl")
    save_jsonl(sample_vote_pairs(world, num_items, 5, torch.Generator().manual_seed(2)).to_records(),
               root / "pairs.jsonl")
    return TextWorld(backbone, root / "ratings.jsonl", root / "pairs.jsonl", records)


def train_text_run(world: TextWorld, out: Path, method: str, *extra: str) -> Path:
    """``train-rm --method METHOD`` on the world's texts into ``out`` (qrm: ratings + pairs; bt:
    pairs; gmm: ratings), linear heads (``--trunk_layers 0``) unless ``extra`` overrides it."""
    data = {"qrm": ["--data", str(world.ratings), "--pairs", str(world.pairs)],
            "gmm": ["--data", str(world.ratings)], "mean-var": ["--data", str(world.ratings)]}.get(
        method, ["--data", str(world.pairs)])
    argv = ["train-rm", "--method", method, "--out", str(out), *data, "--backbone", str(world.backbone),
            "--max_length", "48", "--steps", "20", "--gate_steps", "10", "--batch_size", "16",
            "--trunk_layers", "0", "--progress", "false", *extra]
    assert main(argv) == 0
    return out


_SHARED: dict[str, tuple[TextWorld, Path, Path]] = {}


def shared_runs() -> tuple[TextWorld, Path, Path]:
    """One tiny text world with a one-attribute linear ``qrm`` run (300 steps: long enough that its
    quantiles do not cross on the world's texts) and a linear ``bt`` run, built once per test
    process and shared by the export/score/dir tests (read-only: copy a run before changing it).
    Lives in a temporary directory removed at exit."""
    if "runs" not in _SHARED:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="prefcore-rm-runs-"))
        atexit.register(shutil.rmtree, root, True)
        world = text_world(root / "world")
        _SHARED["runs"] = (world, train_text_run(world, root / "qrm", "qrm", "--steps", "300"),
                           train_text_run(world, root / "bt", "bt"))
    return _SHARED["runs"]
