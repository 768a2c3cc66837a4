"""The stages of ``prefcore demo``: the papers' story end to end on the text world.

1. ``world`` — the text world (:class:`prefcore.data.text_world.TextWorld`): a tiny causal LM
   built in code and pretrained briefly on the synthetic language, and the simulated population;
2. ``feedback`` — DFL-style feedback on the pretrained policy's samples: every response rated by
   7–10 annotators, consecutive responses to a prompt voted on (train and held-out sets);
3. ``rm-bt``, ``rm-qrm``, ``rm-gmm`` — reward models on the policy's frozen features, trained
   exactly as ``prefcore train-rm`` does (the configs are parsed from the printed flags);
4. ``seed-<s>/rloo-<utility>`` — per seed of ``--seeds``: RLOO from the pretrained policy against
   the QRM reward model with the ``mean``, ``ce:λ``, ``mean-var:α`` and ``cvar:α`` utilities
   under one KL penalty, exactly as ``prefcore train-policy`` does;
5. ``eval`` — the reward models' calibration on the held-out feedback (``OUT/eval/metrics.json``),
   and per seed ``seed-<s>/eval`` — every policy's samples scored on the *true* population (mean
   rating, CRR, PMR vs the start, left-tail quantiles, KL to the start) on that seed's held-out
   prompts (``OUT/seed-<s>/eval/metrics.json``).

Stages 1–3 are shared by all seeds (seeded by ``--world_seed``).

Each stage is resumable (:mod:`prefcore.demo.stages`); the report is rebuilt from the files.
"""
from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TAIL_LEVELS = (0.05, 0.10, 0.25)
RM_METHODS = ("bt", "qrm", "gmm")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (:meth:`full` or :meth:`quick`); every field enters the stage keys."""

    pretrain_steps: int
    feedback_prompts: int
    heldout_prompts: int
    rm_steps: int
    gate_steps: int
    rloo_steps: int
    rloo_prompts_per_step: int
    num_generations: int
    eval_prompts: int
    eval_samples: int
    max_completion_length: int = 24
    learning_rate: float = 2e-3
    kl_coef: float = 0.05
    utilities: tuple[str, ...] = ("mean", "ce:4", "mean-var:1", "cvar:0.25")

    @classmethod
    def full(cls) -> DemoSettings:
        return cls(pretrain_steps=300, feedback_prompts=400, heldout_prompts=100, rm_steps=400, gate_steps=150,
                   rloo_steps=30, rloo_prompts_per_step=8, num_generations=4, eval_prompts=96, eval_samples=4)

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(pretrain_steps=60, feedback_prompts=96, heldout_prompts=32, rm_steps=80, gate_steps=30,
                   rloo_steps=4, rloo_prompts_per_step=4, num_generations=4, eval_prompts=24, eval_samples=2)


def _policy_name(utility: str) -> str:
    return "rloo-" + utility.replace(":", "")


# ---- stage 1: the world -----------------------------------------------------------------------

def stage_world(out: Path, *, seed: int, s: DemoSettings, progress: bool) -> dict[str, Any]:
    from prefcore.data.text_world import TextWorld

    world = TextWorld()
    model = world.make_policy(seed=seed)
    losses = world.pretrain(model, steps=s.pretrain_steps, seed=seed, progress=progress)
    world.save(out / "policy", model)
    probe = world.prompts(128, seed=seed + 7)
    samples = world.generate(model, probe, seed=seed + 8, max_new_tokens=s.max_completion_length)
    lengths = [len(t.split()) for t in samples]
    weights = [float(w) for w in world.type_weights]
    return {
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_size": int(model.config.vocab_size),
        "pretrain_steps": s.pretrain_steps,
        "final_loss": float(losses[-1]) if losses else None,
        "mean_length": sum(lengths) / len(lengths),
        "contentious_fraction": world.contentious_fraction(samples),
        "num_types": len(weights),
        "type_names": list(world.type_names),
        "type_weights": weights,
        "minority_share": min(weights),
    }


# ---- stage 2: feedback ------------------------------------------------------------------------

def stage_feedback(out: Path, *, world_dir: Path, seed: int, s: DemoSettings) -> dict[str, Any]:
    from prefcore.data.text_world import TextWorld

    world = TextWorld.load(world_dir / "policy")
    model = TextWorld.load_policy(world_dir / "policy")
    result: dict[str, Any] = {}
    for split, n, offset in (("train", s.feedback_prompts, 11), ("heldout", s.heldout_prompts, 13)):
        prompts = world.prompts(n, seed=seed * 1000 + offset)
        fb = world.sample_feedback(model, prompts, seed=seed * 1000 + offset + 1, samples_per_prompt=2,
                                   max_new_tokens=s.max_completion_length)
        fb.save(out / split)
        result[split] = {"num_rated": len(fb.ratings), "num_pairs": len(fb.pairs), "skipped_empty": fb.skipped_empty}
    from prefcore.data.io import save_jsonl

    rloo_prompts = world.prompts(max(64, s.rloo_steps * s.rloo_prompts_per_step), seed=seed * 1000 + 15)
    save_jsonl([{"prompt": p} for p in rloo_prompts], out / "train" / "prompts.jsonl")
    result["rloo_prompts"] = len(rloo_prompts)
    lens = [len(r["scores"]) for r in _read_jsonl(out / "train" / "ratings.jsonl")]
    result["ratings_per_response"] = f"{min(lens)}–{max(lens)}"
    return result


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- stage 3: reward models -------------------------------------------------------------------

def rm_flags(method: str, *, out: Path, feedback: Path, world_dir: Path, seed: int, s: DemoSettings) -> list[str]:
    """The ``prefcore train-rm`` flags of one reward model (the demo parses and runs exactly these)."""
    train = feedback / "train"
    data = train / ("pairs.jsonl" if method == "bt" else "ratings.jsonl")
    flags = ["--method", method, "--data", str(data), "--backbone", str(world_dir / "policy"), "--out", str(out),
             "--steps", str(s.rm_steps), "--seed", str(seed), "--batch_size", "128", "--lr", "3e-3",
             "--checkpoint_every", str(max(1, s.rm_steps // 2))]
    if method == "qrm":
        flags += ["--pairs", str(train / "pairs.jsonl"), "--gate_steps", str(s.gate_steps), "--trunk_layers", "1"]
    if method == "gmm":
        flags += ["--k", "3"]
    return flags


def stage_reward_model(out: Path, flags: Sequence[str], *, progress: bool) -> dict[str, Any]:
    from prefcore.train.rm.cli import parse_train_rm
    from prefcore.train.rm import train_reward_model

    import contextlib
    import io

    cfg = parse_train_rm([*flags, *([] if progress else ["--progress", "false"])])
    # train-rm prints its whole held-out report; the demo's console keeps one line per stage (the
    # report is in OUT/rm-<method>/report.json and the demo's report.md). Bars go to stderr.
    with contextlib.redirect_stdout(io.StringIO()):
        report = train_reward_model(cfg)
    return {"report": report}


# ---- stage 4: RLOO ----------------------------------------------------------------------------

def policy_flags(utility: str, *, out: Path, world_dir: Path, rm_dir: Path, seed: int, s: DemoSettings,
                 prompts_file: Path) -> list[str]:
    """The ``prefcore train-policy`` flags of one RLOO run (the demo parses and runs exactly these)."""
    flags = ["--algo", "rloo", "--model_name_or_path", str(world_dir / "policy"), "--reward_model", str(rm_dir),
             "--utility", utility, "--dataset", str(prompts_file), "--output_dir", str(out),
             "--max_steps", str(s.rloo_steps), "--per_device_train_batch_size", str(s.rloo_prompts_per_step),
             "--num_generations", str(s.num_generations), "--max_completion_length", str(s.max_completion_length),
             "--learning_rate", str(s.learning_rate), "--kl_coef", str(s.kl_coef), "--seed", str(seed),
             "--save_steps", str(max(1, s.rloo_steps // 2)), "--device", "cpu"]
    return flags


def stage_policy(out: Path, flags: Sequence[str], *, progress: bool) -> dict[str, Any]:
    from prefcore.train.policy import train_policy
    from prefcore.train.policy.cli import parse_train_policy

    cfg = parse_train_policy([*flags, *([] if progress else ["--no_progress", "true"])])
    summary = train_policy(cfg)
    return {"summary": summary}


# ---- stage 5: evaluation on the true population -----------------------------------------------

@torch.no_grad()
def _sample(model, tokenizer, prompts: Sequence[str], *, seed: int, max_new_tokens: int):
    """Sampled completions with their ids: ``(prompt_ids, prompt_mask, completion_ids,
    completion_mask, texts)``; the mask covers the tokens up to and including the first EOS."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    comp = gen[:, enc["input_ids"].shape[1]:]
    is_eos = comp == tokenizer.eos_token_id
    before_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
    mask = before_eos  # generate pads only after a row's EOS
    texts = tokenizer.batch_decode(comp.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True)
    return enc["input_ids"], enc["attention_mask"], comp, mask, texts


@torch.no_grad()
def _sequence_logprob(model, prompt_ids, prompt_mask, comp, mask) -> torch.Tensor:
    from prefcore.train.policy.logprobs import completion_logprobs

    lp, _, _ = completion_logprobs(model, prompt_ids, prompt_mask, comp, mask)
    return (lp * mask).sum(-1).double()


def evaluate_policies(world, tokenizer, policies: dict[str, Any], start, prompts: Sequence[str], *,
                      seed: int, max_new_tokens: int) -> dict[str, dict[str, float]]:
    """True-population metrics of each policy's samples on ``prompts`` (same sampling seed for all,
    so the start policy is compared with itself on identical completions: PMR 0.5, KL 0)."""
    from prefcore.eval import metrics as M

    start_samples = _sample(start, tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens)
    start_rating = world.mean_rating(prompts, start_samples[4])
    levels = torch.tensor(TAIL_LEVELS, dtype=torch.float64)
    out: dict[str, dict[str, float]] = {}
    for name, model in policies.items():
        pid, pm, comp, mask, texts = _sample(model, tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens)
        rating = world.mean_rating(prompts, texts)
        tail = world.rating_quantiles(prompts, texts, levels).mean(0)
        kl = (_sequence_logprob(model, pid, pm, comp, mask) - _sequence_logprob(start, pid, pm, comp, mask)).mean()
        out[name] = {
            "mean_rating": float(rating.mean()),
            "crr": float(world.crr(prompts, texts)),
            "pmr": float(M.pmr(rating, start_rating)),
            "q05": float(tail[0]), "q10": float(tail[1]), "q25": float(tail[2]),
            "kl_to_start": float(kl),
            "mean_length": float(mask.sum(-1).double().mean()),
            "contentious_fraction": float(world.contentious_fraction(texts)),
        }
    return out


def split_ratings(split: Path):
    """The rated responses of a feedback split (``split/ratings.jsonl``) as a
    :class:`prefcore.data.RatingsDataset` (``scores_tensor`` pads the ragged scores)."""
    from prefcore.data import load_ratings

    return load_ratings(_read_jsonl(split / "ratings.jsonl"))


def evaluate_reward_models(rm_dirs: dict[str, Path], heldout: Path) -> dict[str, dict[str, float | None]]:
    """Calibration of each reward model on the held-out rated responses and vote pairs."""
    from prefcore import distributions as D
    from prefcore.eval import metrics as M
    from prefcore.train.rm import RunScorer

    ratings = split_ratings(heldout)
    pairs = _read_jsonl(heldout / "pairs.jsonl")
    scores, mask = ratings.scores_tensor(torch.float64)
    ratings = ratings.records
    taus = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    out: dict[str, dict[str, float | None]] = {}
    for name, path in rm_dirs.items():
        scorer = RunScorer.load(str(path))
        chosen = scorer.reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
        rejected = scorer.reward([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
        row: dict[str, float | None] = {"pairwise_accuracy": float(M.pairwise_accuracy(chosen, rejected)),
                                        "coverage_error": None, "crps": None, "nll": None}
        dist = scorer.reward_distribution([r.prompt for r in ratings], [r.response for r in ratings])
        if isinstance(dist, D.QuantileDistribution):
            values = dist.values.double()
            cov = M.quantile_coverage(values, dist.taus.double(), scores, mask)
            row["coverage_error"] = float((cov - dist.taus.double()).abs().mean())
            row["crps"] = float(M.crps(dist, scores.to(values.dtype), mask))
        elif isinstance(dist, D.GaussianMixture):
            values = dist.quantile(taus.to(dist.mu.dtype)).double()
            cov = M.quantile_coverage(values, taus, scores, mask)
            row["coverage_error"] = float((cov - taus).abs().mean())
            row["crps"] = float(M.crps(dist, scores.to(dist.mu.dtype), mask))
            row["nll"] = float(M.nll(dist, scores.to(dist.mu.dtype), mask))
        out[name] = row
    return out


def command_line(prog: str, flags: Sequence[str]) -> str:
    return f"prefcore {prog} " + shlex.join(list(flags))


def load_policies(policy_dirs: dict[str, Path], start_dir: Path) -> dict[str, Any]:
    """The start policy and each trained policy, by name (start first)."""
    from prefcore.data.text_world import TextWorld

    return {"start": TextWorld.load_policy(start_dir),
            **{name: TextWorld.load_policy(path) for name, path in policy_dirs.items()}}
