r"""``prefcore score-rm``: score a JSONL file of (prompt, response) rows with a reward model, at scale.

>>> prefcore score-rm --reward_model runs/rm-qrm --data rows.jsonl --out scores.jsonl --utility mean,ce:2,cvar:0.1

Input rows: JSON objects with string fields ``prompt`` and ``response`` (other fields are ignored).
Output: one JSON object per input row, in input order::

    {"index": 0, "text_sha256": "…", "mean": 0.41,
     "quantiles": {"0.05": -0.9, …, "0.95": 1.6},          # qrm: the model's levels
     "mixture": {"weights": […], "mu": […], "sigma": […]},  # gmm, mean-var (K = 1)
     "utilities": {"mean": 0.41, "ce:2": 0.12, "cvar:0.1": -0.7}}

(bt / bt-margin: ``mean`` is the scalar reward, and only the ``mean`` utility applies.)

Batching by length: rows are ordered by token count and cut into batches of at most
``batch_tokens`` padded tokens (``rows × longest``), so no batch is padded to a rare long row.

Sharding: under ``torchrun`` the batches (formed identically on every rank) are dealt round-robin
to the ranks, each rank scores its own and appends them to ``OUT.rank<r>.partial``; rank 0 merges
all rows in input order into ``OUT``. A batch is computed the same way whichever rank runs it, so
the result is bit-identical to a one-process run with the same number of threads per process
(CPU kernels may split reductions by thread count).

Resume: rows already in ``OUT`` or in partial files (complete lines; a torn last line is ignored)
are kept and not scored again, so an interrupted or truncated run continues where it stopped.
Each row carries ``text_sha256`` of its prompt and response; a kept row whose hash does not match
the input is refused (the data changed). The final ``OUT`` is written atomically and the partial
files are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prefcore.utility import Utility, parse_utility


@dataclass
class ScoreRMConfig:
    """Settings of ``prefcore score-rm``."""

    reward_model: str = field(metadata={"help": "a prefcore train-rm run directory (trained on text)"})
    data: str = field(metadata={"help": "JSONL file of rows with 'prompt' and 'response' strings"})
    out: str = field(metadata={"help": "output JSONL (one row per input row, input order); resumable"})
    utility: str = field(default="mean", metadata={"help": "comma-separated utilities: mean, ce:λ, mean-var:α, "
                                                           "cvar:α, quantile:τ"})
    batch_tokens: int = field(default=8192, metadata={"help": "most padded tokens (rows × longest) per batch"})
    device: str = field(default="cpu", metadata={"help": "device of the backbone"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self) -> None:
        specs = [s for s in (x.strip() for x in self.utility.split(",")) if s]
        if not specs:
            raise ValueError(f"--utility must name at least one utility, got {self.utility!r}")
        self.utilities: list[Utility] = [parse_utility(s, setting="--utility") for s in specs]
        if isinstance(self.batch_tokens, bool) or self.batch_tokens < 1:
            raise ValueError(f"--batch_tokens must be >= 1, got {self.batch_tokens}")
        for f in ("heads.json", "config.json"):
            if not os.path.isfile(os.path.join(self.reward_model, f)):
                raise FileNotFoundError(f"--reward_model {self.reward_model!r} has no {f} (a finished "
                                        "`prefcore train-rm` run is needed)")
        if not os.path.isfile(self.data):
            raise FileNotFoundError(f"--data {self.data!r} does not exist")
        if os.path.isdir(self.out):
            raise IsADirectoryError(f"--out {self.out!r} is a directory; name the output JSONL file")


def read_rows(path: str) -> tuple[list[str], list[str]]:
    """``(prompts, responses)`` of a JSONL file; a bad line raises ``ValueError`` naming it."""
    prompts, responses = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--data {path!r}, line {n}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "response")):
                raise ValueError(f"--data {path!r}, line {n}: expected an object with string fields 'prompt' and "
                                 "'response'")
            prompts.append(row["prompt"])
            responses.append(row["response"])
    if not prompts:
        raise ValueError(f"--data {path!r} holds no rows")
    return prompts, responses


def text_sha256(prompt: str, response: str) -> str:
    h = hashlib.sha256()
    for s in (prompt, response):
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Row indices ordered by length (stable) and cut greedily so that ``len(batch) × longest ≤
    batch_tokens`` (a single row longer than that is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * max(lengths[i], 1) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def read_scored(path: str) -> dict[int, dict]:
    """Complete rows of an output or partial file, keyed by index (a torn last line is ignored)."""
    rows: dict[int, dict] = {}
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the line an interrupted writer left half-written
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            rows[int(row["index"])] = row
    return rows


def batch_rows(indices: Sequence[int], shas: Sequence[str], dist, utilities: Sequence[Utility]) -> list[dict]:
    """The output rows of one scored batch (``dist``: the batch's distribution, or scalar rewards)."""
    from prefcore import distributions as D

    scalar = isinstance(dist, torch.Tensor)
    mean = (dist if scalar else dist.mean()).double().tolist()
    utils = {str(u): u(dist).double().tolist() for u in utilities}
    rows = []
    for j, i in enumerate(indices):
        row: dict = {"index": i, "text_sha256": shas[i], "mean": mean[j]}
        if isinstance(dist, D.QuantileDistribution):
            row["quantiles"] = {f"{t:g}": v for t, v in zip(dist.taus.tolist(), dist.values[j].double().tolist())}
        elif not scalar:
            row["mixture"] = {"weights": torch.softmax(dist.logits[j].double(), -1).tolist(),
                              "mu": dist.mu[j].double().tolist(), "sigma": dist.log_sigma[j].double().exp().tolist()}
        row["utilities"] = {k: v[j] for k, v in utils.items()}
        rows.append(row)
    return rows


def score_reward_model(cfg: ScoreRMConfig) -> str:
    """Score ``cfg.data`` into ``cfg.out`` (see the module docstring); returns ``cfg.out``."""
    import torch.distributed as dist

    from prefcore._progress import library_output
    from prefcore.train.distributed import maybe_init
    from prefcore.train.distributed import world as dist_world

    own_group = maybe_init(cfg.device)
    rank, world = dist_world()
    try:
        with library_output(cfg.progress and rank == 0):
            return _score(cfg, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _score(cfg: ScoreRMConfig, rank: int, world: int) -> str:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from prefcore._io import atomic_write_text
    from prefcore.train.rm.features import embed_texts
    from prefcore.train.rm.scoring import RunScorer
    from prefcore.train.rm.sources import response_text

    with open(os.path.join(cfg.reward_model, "heads.json")) as f:
        method = json.load(f)["method"]
    if method in ("bt", "bt-margin"):
        bad = [str(u) for u in cfg.utilities if not u.is_risk_neutral]
        if bad:
            raise ValueError(f"--utility {bad}: a {method} run gives scalar rewards; only 'mean' applies")
    prompts, responses = read_rows(cfg.data)
    shas = [text_sha256(p, r) for p, r in zip(prompts, responses)]
    partial = [f"{cfg.out}.rank{r}.partial" for r in range(world)]
    kept: dict[int, dict] = read_scored(cfg.out)
    for p in partial:
        kept.update(read_scored(p))
    for i, row in kept.items():
        if i >= len(shas) or row.get("text_sha256") != shas[i]:
            raise ValueError(f"--out {cfg.out!r} holds row {i} for a different text than --data {cfg.data!r} line "
                             f"{i + 1}: delete the output (and its .partial files) to score again")
    todo = [i for i in range(len(prompts)) if i not in kept]

    from prefcore.train.distributed import rank_device

    scorer = RunScorer.load(cfg.reward_model, device=rank_device(cfg.device))  # cuda: this rank's GPU
    if scorer.backbone is None:
        raise ValueError(f"--reward_model {cfg.reward_model!r} was trained on features (synthetic default), so it "
                         "cannot score texts; train it with --backbone")
    texts = [response_text(p, r) for p, r in zip(prompts, responses)]
    # Batches are formed over ALL rows, identically on every rank and in every (resumed) run, so a
    # row's batch — and hence its floating-point result — never depends on sharding or resumption.
    lengths = [len(e) for e in scorer.tokenizer(texts, truncation=True, max_length=scorer.max_length)["input_ids"]]
    batches = [b for b in length_batches(lengths, cfg.batch_tokens) if any(i not in kept for i in b)]
    mine = batches[rank::world]
    if rank == 0 and kept:
        print(f"prefcore score-rm: resuming, {len(kept)} of {len(prompts)} rows already scored")
    bar = tqdm(total=sum(len(b) for b in mine), desc="score-rm", unit="row", disable=not cfg.progress or rank != 0)
    with open(partial[rank], "a", encoding="utf-8") as out, torch.no_grad():
        for b in mine:
            feats = embed_texts(scorer.backbone, scorer.tokenizer, [texts[i] for i in b], batch_size=len(b),
                                max_length=scorer.max_length).float()
            prompt_feats = None
            if method == "qrm":  # the gate reads the prompt's features, as RunScorer.text_features does
                prompt_feats = embed_texts(scorer.backbone, scorer.tokenizer, [prompts[i] for i in b],
                                           batch_size=len(b), max_length=scorer.max_length).float()
            rows = batch_rows(b, shas, scorer.distribution_from_features(feats, prompt_feats), cfg.utilities)
            out.write("".join(json.dumps(r) + "\n" for r in rows if r["index"] not in kept))
            out.flush()  # a complete batch survives an interruption
            bar.update(len(b))
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        rows = dict(kept)
        for p in partial:
            rows.update(read_scored(p))
        missing = [i for i in range(len(prompts)) if i not in rows]
        if missing:
            raise RuntimeError(f"score-rm: rows {missing[:8]} were not scored")
        atomic_write_text(cfg.out, "".join(json.dumps(rows[i]) + "\n" for i in range(len(prompts))))
        for p in partial:
            if os.path.exists(p):
                os.remove(p)
        print(f"prefcore score-rm → {cfg.out} ({len(prompts)} rows, {len(todo)} scored now)")
    if world > 1:
        dist.barrier()
    return cfg.out
