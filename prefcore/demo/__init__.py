"""``prefcore demo``: the whole story of the papers on the text world, with a report and plots.

:func:`run_demo` runs the stages of :mod:`prefcore.demo.pipeline` under ``DemoConfig.out``:
the shared ``world``, ``feedback``, ``rm-*`` and ``eval`` (reward-model calibration) stages once,
then for every seed of ``--seeds`` (default ``0,1,2``; ``--quick``: ``0``) the RLOO runs and their
evaluation on the true population under ``OUT/seed-<s>/``. Every stage is resumable: a re-run with
the same ``out`` reuses finished stages, and adding a seed runs only that seed's stages. It then
writes ``summary.json`` (each policy metric's per-seed values, mean and sample standard deviation),
``report.md`` (mean ± sd tables, findings with seed counts, per-seed tables), the PNG plots, and
prints the summary table. Deterministic for a seed list on one machine and thread count.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefcore._io import atomic_write_json, atomic_write_text
from prefcore.demo import pipeline as P
from prefcore.demo import plots, report
from prefcore.demo.stages import StageRunner

__all__ = ["DemoConfig", "run_demo"]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)``: distinct integers ``>= 0``, comma-separated, in the given order."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p.isdigit() for p in parts):
        raise ValueError(f"seeds must be comma-separated integers >= 0 (e.g. 0,1,2), got {text!r}")
    seeds = tuple(int(p) for p in parts)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {text!r}")
    return seeds


FULL_SEEDS = "0,1,2"
QUICK_SEEDS = "0"


@dataclass
class DemoConfig:
    """Settings of ``prefcore demo``.

    ``seeds`` are the seeds of the per-seed stages (the RLOO runs and their evaluation, under
    ``OUT/seed-<s>/``); the world, the feedback and the reward models are shared by all seeds and
    seeded by ``world_seed``, so adding a seed to a finished run trains only that seed's policies.
    ``seed_list`` holds the parsed seeds."""

    out: str = field(default=os.path.join("runs", "demo"), metadata={"help": "output directory"})
    seeds: str | None = field(default=None, metadata={
        "help": f"comma-separated seeds of the RLOO stages (default {FULL_SEEDS}; with --quick {QUICK_SEEDS}); "
                "`--seed N` is accepted as `--seeds N`"})
    world_seed: int = field(default=0, metadata={
        "help": "seed of the stages shared by all seeds: world, feedback, reward models"})
    quick: bool = field(default=False, metadata={"help": "small sizes, one seed: under a minute on 2 cores"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})
    seed_list: tuple[int, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        default = QUICK_SEEDS if self.quick else FULL_SEEDS
        self.seed_list = parse_seeds(self.seeds if self.seeds is not None else default)
        if isinstance(self.world_seed, bool) or not isinstance(self.world_seed, int) or self.world_seed < 0:
            raise ValueError(f"world_seed must be an integer >= 0, got {self.world_seed!r}")
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
    """Run (or resume) the demo; returns ``summary.json``'s contents (:func:`report.aggregate`).

    The console shows one line per stage and prefcore's own progress bars (none with
    ``no_progress``); the libraries' chatter — transformers' load reports ("lm_head.weight
    UNEXPECTED": the text-world policy is loaded as a backbone without its head, which is intended)
    and weight-loading bars, datasets' "Generating train split" bars — is always off
    (:func:`prefcore._progress.library_output`), warnings below errors included."""
    from prefcore._progress import library_output

    with library_output(False):
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
    ws = cfg.world_seed
    # the shared stages' keys hold neither the seed list nor anything per-seed, so adding a seed reuses them
    base_key = {"seed": ws, "settings": asdict(s)}

    world = runner.run("world", base_key, lambda d: P.stage_world(d, seed=ws, s=s, progress=progress))
    world_dir = out / "world"
    fb = runner.run("feedback", base_key, lambda d: P.stage_feedback(d, world_dir=world_dir, seed=ws, s=s))
    feedback_dir = out / "feedback"

    commands: dict[str, str] = {"world, feedback, eval, report": f"prefcore demo --out {out} "
                                f"--seeds {','.join(map(str, cfg.seed_list))} --world_seed {ws}"
                                + (" --quick" if cfg.quick else "")}
    rm_dirs: dict[str, Path] = {}
    for method in P.RM_METHODS:
        name = f"rm-{method}"
        flags = P.rm_flags(method, out=out / name, feedback=feedback_dir, world_dir=world_dir, seed=ws, s=s)
        commands[name] = P.command_line("train-rm", flags)
        runner.run(name, {**base_key, "flags": _portable(flags, out)},
                   lambda d, f=flags: P.stage_reward_model(d, f, progress=progress))
        rm_dirs[name] = out / name

    def stage_eval(d: Path) -> dict[str, Any]:
        metrics = {
            "world_seed": ws, "quick": cfg.quick, "threads": torch.get_num_threads(),
            "version": prefcore.__version__, "torch": torch.__version__,
            "world": world, "feedback": {"num_rated": fb["train"]["num_rated"], "num_pairs": fb["train"]["num_pairs"],
                                         "ratings_per_response": fb["ratings_per_response"]},
            "reward_models": P.evaluate_reward_models(rm_dirs, feedback_dir / "heldout"), "rm_order": list(rm_dirs),
        }
        atomic_write_json(d / "metrics.json", metrics)
        return {"metrics": "eval/metrics.json"}

    runner.run("eval", {**base_key, "rms": sorted(rm_dirs)}, stage_eval)
    shared = _read_json(out / "eval" / "metrics.json")

    prompts_file = out / "feedback" / "train" / "prompts.jsonl"
    per_seed: dict[int, dict[str, Any]] = {}
    policy_dirs: dict[int, dict[str, Path]] = {}
    for seed in cfg.seed_list:
        per_seed[seed], policy_dirs[seed] = _run_seed(runner, cfg, s, seed, world_dir=world_dir,
                                                      rm_dir=rm_dirs["rm-qrm"], prompts_file=prompts_file,
                                                      commands=commands, progress=progress)

    summary = report.aggregate(per_seed)
    atomic_write_json(out / "summary.json", summary)
    figures = _figures(out, summary, world_dir, rm_dirs, policy_dirs, feedback_dir)
    text = report.render(shared, per_seed, commands, figures)
    atomic_write_text(out / "report.md", text)
    print("\n" + report.summary_table(summary))
    print(f"\nprefcore demo: report in {out / 'report.md'} ({time.perf_counter() - start:.0f} s; "
          f"stages run: {', '.join(runner.ran) or 'none'}; reused: {', '.join(runner.reused) or 'none'})")
    return summary


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _run_seed(runner: StageRunner, cfg: DemoConfig, s: P.DemoSettings, seed: int, *, world_dir: Path, rm_dir: Path,
              prompts_file: Path, commands: dict[str, str], progress: bool) -> tuple[dict[str, Any], dict[str, Path]]:
    """The per-seed stages ``seed-<s>/rloo-<utility>`` and ``seed-<s>/eval``; returns that seed's
    ``eval/metrics.json`` and its policies' directories."""
    out = runner.out
    sub = f"seed-{seed}"
    key = {"seed": seed, "world_seed": cfg.world_seed, "settings": asdict(s)}
    policy_dirs: dict[str, Path] = {}
    for utility in s.utilities:
        name = P._policy_name(utility)
        flags = P.policy_flags(utility, out=out / sub / name, world_dir=world_dir, rm_dir=rm_dir, seed=seed,
                               s=s, prompts_file=prompts_file)
        commands[f"{sub}/{name}"] = P.command_line("train-policy", flags)
        runner.run(f"{sub}/{name}", {**key, "flags": _portable(flags, out)},
                   lambda d, f=flags: P.stage_policy(d, f, progress=progress))
        policy_dirs[name] = out / sub / name / "policy"

    def stage_eval(d: Path) -> dict[str, Any]:
        import torch

        from prefcore.data.text_world import TextWorld

        tw = TextWorld.load(world_dir / "policy")
        models = P.load_policies(policy_dirs, world_dir / "policy")
        # per seed: fresh evaluation prompts and samples, so the spread includes the evaluation's noise;
        # within a seed every policy sees the same prompts and sampling seed (a paired comparison)
        prompts = [p for p in tw.prompts(s.eval_prompts, seed=seed * 1000 + 17) for _ in range(s.eval_samples)]
        pols = P.evaluate_policies(tw, tw.tokenizer, models, models["start"], prompts, seed=seed * 1000 + 19,
                                   max_new_tokens=s.max_completion_length)
        atomic_write_json(d / "metrics.json", {"seed": seed, "threads": torch.get_num_threads(),
                                               "policies": pols, "policy_order": list(models)})
        return {"metrics": f"{sub}/eval/metrics.json"}

    runner.run(f"{sub}/eval", {**key, "policies": sorted(policy_dirs)}, stage_eval)
    return _read_json(out / sub / "eval" / "metrics.json"), policy_dirs


def _figures(out: Path, summary: dict[str, Any], world_dir: Path, rm_dirs: dict[str, Path],
             policy_dirs: dict[int, dict[str, Path]], feedback_dir: Path) -> list[tuple[str, str]]:
    """The four PNGs and their captions; ``summary`` is :func:`report.aggregate`'s output,
    ``policy_dirs[seed][policy]`` the trained policies."""
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
    # 2. QRM Fig. 3: the RM's left-tail quantiles over RLOO training, one faint line per seed
    seeds = list(policy_dirs)
    names = list(policy_dirs[seeds[0]])
    tail_keys = {str(t): f"reward_quantile/{t}" for t in P.TAIL_LEVELS}
    tails = {n: {str(sd): _curves(policy_dirs[sd][n].parent, tail_keys) for sd in seeds} for n in names}
    plots.left_tail_quantiles(out / "left_tail_quantiles.png", tails)
    figs.append(("left_tail_quantiles.png", "The QRM reward model's predicted left-tail quantiles (τ ≤ 0.25) of the "
                                            "sampled completions over RLOO training, per utility (QRM Fig. 3); "
                                            f"faint lines: the {len(seeds)} seeds, bold: their mean"))
    # 3. risk trade-off: per-seed points and the mean ± sd over seeds
    pols = summary["policies"]
    points = [{"name": n, "mean_rating": pols[n]["mean_rating"]["values"], "crr": pols[n]["crr"]["values"]}
              for n in summary["policy_order"]]
    plots.risk_tradeoff(out / "risk_tradeoff.png", points)
    figs.append(("risk_tradeoff.png", "True mean rating vs CRR per policy (DFL Table 3): faint dots are the "
                                      f"{len(seeds)} seeds, bars the mean ± sd over seeds"))
    # 4. training curves
    curves = {n: {str(sd): _curves(policy_dirs[sd][n].parent, {"reward": "reward", "utility": "utility", "kl": "kl"})
                  for sd in seeds} for n in names}
    plots.training_curves(out / "training_curves.png", curves)
    figs.append(("training_curves.png", "RLOO training: mean reward-model reward, utility, and KL per step "
                                        "(faint: per seed; bold: mean over seeds)"))
    return figs
