"""``prefcore demo``: the whole story of the papers on the text world, with a report and plots.

:func:`run_demo` runs the stages of :mod:`prefcore.demo.pipeline` under ``DemoConfig.out``
(resumable: an interrupted run re-run with the same ``out`` reuses finished stages), then writes
``report.md``, the PNG plots and prints the summary table. Deterministic for a seed on one machine
and thread count.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefcore.demo import pipeline as P
from prefcore.demo import plots, report
from prefcore.demo.stages import StageRunner

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of ``prefcore demo``."""

    out: str = field(default=os.path.join("runs", "demo"), metadata={"help": "output directory"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    quick: bool = field(default=False, metadata={"help": "small sizes: finishes in under 2 minutes on 2 cores"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"out {self.out!r} exists and is not a directory")


def _curves(run_dir: Path, keys: dict[str, str]) -> dict[str, list[list[float]]]:
    """``{label: [[step, value], …]}`` of metrics ``keys = {label: metric name}`` in ``metrics.jsonl``."""
    out: dict[str, list[list[float]]] = {label: [] for label in keys}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            for label, key in keys.items():
                if key in rec and rec[key] is not None:
                    out[label].append([rec["step"], rec[key]])
    return out


def _portable(flags: list[str], out: Path) -> list[str]:
    """A stage key independent of where ``OUT`` lives (a moved or copied run keeps its stages)."""
    return [f.replace(str(out), "OUT") for f in flags]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or resume) the demo; returns ``eval/metrics.json``'s contents. ``no_progress`` silences
    every bar and library load report (:mod:`prefcore._progress`)."""
    from prefcore._progress import library_output

    with library_output(not cfg.no_progress):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import torch

    import prefcore

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    s = P.DemoSettings.quick() if cfg.quick else P.DemoSettings.full()
    progress = not cfg.no_progress
    runner = StageRunner(out)
    base_key = {"seed": cfg.seed, "settings": asdict(s)}

    world = runner.run("world", base_key, lambda d: P.stage_world(d, seed=cfg.seed, s=s, progress=progress))
    world_dir = out / "world"
    fb = runner.run("feedback", base_key, lambda d: P.stage_feedback(d, world_dir=world_dir, seed=cfg.seed, s=s))
    feedback_dir = out / "feedback"

    commands: dict[str, str] = {"world, feedback, eval, report": f"prefcore demo --out {out} --seed {cfg.seed}"
                                + (" --quick" if cfg.quick else "")}
    rm_dirs: dict[str, Path] = {}
    for method in P.RM_METHODS:
        name = f"rm-{method}"
        flags = P.rm_flags(method, out=out / name, feedback=feedback_dir, world_dir=world_dir, seed=cfg.seed, s=s)
        commands[name] = P.command_line("train-rm", flags)
        runner.run(name, {**base_key, "flags": _portable(flags, out)},
                   lambda d, f=flags: P.stage_reward_model(d, f, progress=progress))
        rm_dirs[name] = out / name

    prompts_file = out / "feedback" / "train" / "prompts.jsonl"
    policy_dirs: dict[str, Path] = {}
    for utility in s.utilities:
        name = P._policy_name(utility)
        flags = P.policy_flags(utility, out=out / name, world_dir=world_dir, rm_dir=rm_dirs["rm-qrm"], seed=cfg.seed,
                               s=s, prompts_file=prompts_file)
        commands[name] = P.command_line("train-policy", flags)
        runner.run(name, {**base_key, "flags": _portable(flags, out)},
                   lambda d, f=flags: P.stage_policy(d, f, progress=progress))
        policy_dirs[name] = out / name / "policy"

    def stage_eval(d: Path) -> dict[str, Any]:
        from prefcore.data.text_world import TextWorld

        tw = TextWorld.load(world_dir / "policy")
        models = P.load_policies(policy_dirs, world_dir / "policy")
        prompts = [p for p in tw.prompts(s.eval_prompts, seed=cfg.seed * 1000 + 17) for _ in range(s.eval_samples)]
        pols = P.evaluate_policies(tw, tw.tokenizer, models, models["start"], prompts, seed=cfg.seed * 1000 + 19,
                                   max_new_tokens=s.max_completion_length)
        rms = P.evaluate_reward_models(rm_dirs, feedback_dir / "heldout")
        metrics = {
            "seed": cfg.seed, "quick": cfg.quick, "threads": torch.get_num_threads(),
            "version": prefcore.__version__, "torch": torch.__version__,
            "world": world, "feedback": {"num_rated": fb["train"]["num_rated"], "num_pairs": fb["train"]["num_pairs"],
                                         "ratings_per_response": fb["ratings_per_response"]},
            "policies": pols, "reward_models": rms,
            "policy_order": list(models), "rm_order": list(rm_dirs),
        }
        from prefcore._io import atomic_write_json

        atomic_write_json(d / "metrics.json", metrics)
        return {"metrics": "eval/metrics.json"}

    runner.run("eval", {**base_key, "policies": sorted(policy_dirs), "rms": sorted(rm_dirs)}, stage_eval)
    with open(out / "eval" / "metrics.json") as f:
        metrics = json.load(f)

    figures = _figures(out, metrics, world_dir, rm_dirs, policy_dirs, feedback_dir)
    text = report.render(metrics, commands, figures)
    from prefcore._io import atomic_write_text

    atomic_write_text(out / "report.md", text)
    print("\n" + report.summary_table(metrics))
    print(f"\nprefcore demo: report in {out / 'report.md'} ({time.perf_counter() - start:.0f} s; "
          f"stages run: {', '.join(runner.ran) or 'none'}; reused: {', '.join(runner.reused) or 'none'})")
    return metrics


def _figures(out: Path, metrics: dict[str, Any], world_dir: Path, rm_dirs: dict[str, Path],
             policy_dirs: dict[str, Path], feedback_dir: Path) -> list[tuple[str, str]]:
    import torch

    from prefcore import distributions as D
    from prefcore.data.text_world import CONTENTIOUS_WORDS, TextWorld
    from prefcore.train.rm import RunScorer

    figs: list[tuple[str, str]] = []
    # 1. predicted vs true rating distributions of a few held-out responses, one contentious
    tw = TextWorld.load(world_dir / "policy")
    rated = P._read_jsonl(feedback_dir / "heldout" / "ratings.jsonl")
    bad = set(CONTENTIOUS_WORDS)
    contentious = [r for r in rated if bad & set(r["response"].split())]
    plain = [r for r in rated if not bad & set(r["response"].split())]
    chosen = (contentious[:1] + plain[:2]) if contentious else plain[:3]
    grid = torch.linspace(-1, 1, 201, dtype=torch.float64)
    panels = []
    scorers = {name: RunScorer.load(str(rm_dirs[name])) for name in ("rm-qrm", "rm-gmm")}
    for r in chosen:
        p, c = [r["prompt"]], [r["response"]]
        pred = {}
        for name, sc in scorers.items():
            dist = sc.reward_distribution(p, c)
            if isinstance(dist, D.QuantileDistribution):
                pred[name] = {"x": dist.values[0].tolist(), "cdf": dist.taus.tolist()}
            else:
                pred[name] = {"x": grid.tolist(), "cdf": dist.cdf(grid.to(dist.mu.dtype))[0].tolist()}
        title = ("contentious: " if bad & set(r["response"].split()) else "") + " ".join(c[0].split()[:8])
        panels.append({"title": title, "grid": grid.tolist(), "true_cdf": tw.rating_cdf(p, c, grid)[0].tolist(),
                       "predicted": pred})
    plots.rating_distributions(out / "rating_distributions.png", panels)
    figs.append(("rating_distributions.png", "Predicted (QRM, GMM) vs true population rating CDFs of held-out "
                                             "responses; the dotted line is the catastrophe threshold −0.7"))
    # 2. QRM Fig. 3: the RM's left-tail quantiles over RLOO training
    tail_keys = {str(t): f"reward_quantile/{t}" for t in P.TAIL_LEVELS}
    tails = {name: _curves(path.parent, tail_keys) for name, path in policy_dirs.items()}
    plots.left_tail_quantiles(out / "left_tail_quantiles.png", tails)
    figs.append(("left_tail_quantiles.png", "The QRM reward model's predicted left-tail quantiles (τ ≤ 0.25) of the "
                                            "sampled completions over RLOO training, per utility (QRM Fig. 3)"))
    # 3. risk trade-off
    points = [{"name": n, "mean_rating": v["mean_rating"], "crr": v["crr"]} for n, v in metrics["policies"].items()]
    plots.risk_tradeoff(out / "risk_tradeoff.png", points)
    figs.append(("risk_tradeoff.png", "True mean rating vs CRR per policy (DFL Table 3)"))
    # 4. training curves
    curves = {name: _curves(path.parent, {"reward": "reward", "utility": "utility", "kl": "kl"})
              for name, path in policy_dirs.items()}
    plots.training_curves(out / "training_curves.png", curves)
    figs.append(("training_curves.png", "RLOO training: mean reward-model reward, utility, and KL per step"))
    return figs
