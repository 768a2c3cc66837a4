"""``report.md`` and the printed summary of ``prefcore demo``, built only from the numbers the
stages wrote to disk (``eval/metrics.json``: the world, feedback and reward models;
``seed-<s>/eval/metrics.json``: each seed's policies), so the report cannot disagree with the
metrics files. Every number is printed with :func:`fmt`; a statistic over seeds with
:func:`fmt_pm` as ``mean ± sd`` (``statistics.mean`` and the sample standard deviation
``statistics.stdev``, n − 1 in the denominator; a single seed prints its value alone)."""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

POLICY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("mean_rating", "true mean rating"),
    ("crr", "CRR"),
    ("pmr", "PMR vs start"),
    ("q05", "true q0.05"),
    ("q10", "true q0.10"),
    ("q25", "true q0.25"),
    ("kl_to_start", "KL to start"),
    ("mean_length", "mean length"),
)

RM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pairwise_accuracy", "pairwise acc."),
    ("coverage_error", "mean |coverage − τ|"),
    ("crps", "CRPS"),
    ("nll", "NLL"),
)

MEANINGS = """\
- **true mean rating**: the population's exact expected rating of a sampled completion (the
  simulated annotator types weighted by their share), averaged over held-out prompts and samples.
- **CRR** (catastrophic-response rate, DFL §4.3): the fraction of sampled completions that some
  annotator type rates below −0.7 in expectation — computed from the exact ground truth, not from
  sampled ratings.
- **PMR vs start** (preference-matching rate): the fraction of held-out prompts on which the
  population prefers this policy's completion to the starting policy's (higher true mean rating;
  ties count ½). The starting policy scores 0.5 against itself by definition.
- **true q0.05 / q0.10 / q0.25**: left-tail quantiles of the exact population rating distribution
  of each completion, averaged — what the minority that dislikes a completion feels.
- **KL to start**: mean over completions of Σₜ (log π − log π_start) on the sampled tokens (nats per
  completion; a Monte-Carlo estimate of KL(π ‖ π_start)).
- Reward models (held-out rated responses): **pairwise acc.** on held-out vote pairs (majority
  vote), **mean |coverage − τ|** over the 19 quantile levels (QRM; GMM: of its mixture quantiles),
  **CRPS** against the individual annotators' ratings, **NLL** of those ratings (mixtures only).
"""


def fmt(value: Any) -> str:
    """How the report prints a number (the test compares the report with the JSON through this)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.3f}"


def fmt_pm(st: Mapping[str, Any]) -> str:
    """``mean ± sd`` of :func:`stat`'s output (just the mean when there is one seed)."""
    return fmt(st["mean"]) if st["sd"] is None else f"{fmt(st['mean'])} ± {fmt(st['sd'])}"


def signed(value: float) -> str:
    """:func:`fmt` with an explicit sign (``+0.040``, ``-0.120``): for changes."""
    text = fmt(value)
    return text if text.startswith("-") else "+" + text


def stat(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "sd", "values"}`` of per-seed ``values`` (``sd`` None for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("stat needs at least one value")
    return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None, "values": vals}


def aggregate(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The policy metrics over seeds: ``per_seed[seed]`` is ``seed-<s>/eval/metrics.json``.

    Returns ``{"seeds": [...], "policy_order": [...], "policies": {policy: {metric: stat}}}`` with
    :func:`stat` of each metric's per-seed values (in ``seeds`` order). Every seed must hold the
    same policies."""
    seeds = list(per_seed)
    if not seeds:
        raise ValueError("aggregate needs the metrics of at least one seed")
    order = list(per_seed[seeds[0]]["policy_order"])
    for sd in seeds:
        if list(per_seed[sd]["policy_order"]) != order:
            raise ValueError(f"seed {sd} has policies {per_seed[sd]['policy_order']}, seed {seeds[0]} has {order}")
    keys = list(per_seed[seeds[0]]["policies"][order[0]])
    pols = {name: {k: stat([per_seed[sd]["policies"][name][k] for sd in seeds]) for k in keys} for name in order}
    return {"seeds": seeds, "policy_order": order, "policies": pols}


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], first: tuple[str, str]) -> str:
    """A markdown table: ``first = (key, header)`` names the row label column."""
    head = "| " + " | ".join([first[1], *(h for _, h in columns)]) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    body = ["| " + " | ".join([str(r[first[0]]), *(fmt(r.get(k)) for k, _ in columns)]) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def policy_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows in run order (``policy_order``: the start policy, then one per utility)."""
    return [{"policy": name, **metrics["policies"][name]} for name in metrics["policy_order"]]


def rm_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"model": name, **metrics["reward_models"][name]} for name in metrics["rm_order"]]


def _count(k: int, n: int) -> str:
    return f"{k} of {n} seed" + ("s" if n != 1 else "")


def finding(name: str, crr: Sequence[tuple[float, float]], mean: Sequence[tuple[float, float]]) -> str:
    """One sentence comparing policy ``name`` with ``rloo-mean`` over seeds, from the seed-level
    pairs ``crr[i] = (base CRR, policy CRR)`` and ``mean[i] = (base, policy)`` true mean rating.

    The wording follows the counts, never stronger than them: "fell in 3 of 3 seeds, by x ± y"
    only when every seed agrees; "did **not** fall in any of the n seeds" when none did;
    otherwise "the seeds disagree: CRR fell in only k of n seeds". A mean-rating cost is called
    *large* only when the rating fell in every seed by more than 0.1 on average."""
    n = len(crr)
    d_crr = [p - b for b, p in crr]
    d_mean = [p - b for b, p in mean]
    fell = sum(d < 0 for d in d_crr)
    c, m = stat(d_crr), stat(d_mean)
    drop = stat([-d for d in d_crr])
    if fell == n:
        crr_text = f"CRR fell in {_count(n, n)}, by {fmt_pm(drop)}"
    elif fell == 0:
        crr_text = f"CRR did **not** fall in any of the {n} seed{'s' if n != 1 else ''} (change {_pm_signed(c)})"
    else:
        crr_text = f"the seeds disagree: CRR fell in only {_count(fell, n)} (change {_pm_signed(c)})"
    lower = sum(d < 0 for d in d_mean)
    if lower == 0:
        mean_text = f"the true mean rating did not fall in any seed (change {_pm_signed(m)})"
    elif lower == n:
        size = "a large cost: " if m["mean"] < -0.1 else ""
        mean_text = f"the true mean rating fell in {_count(n, n)} ({size}change {_pm_signed(m)})"
    else:
        mean_text = f"the true mean rating fell in {_count(lower, n)} (change {_pm_signed(m)})"
    base_crr, pol_crr = stat([b for b, _ in crr]), stat([p for _, p in crr])
    return (f"- `{name}` vs `rloo-mean`: {crr_text} ({fmt_pm(base_crr)} → {fmt_pm(pol_crr)}); {mean_text}.")


def _pm_signed(st: Mapping[str, Any]) -> str:
    return signed(st["mean"]) if st["sd"] is None else f"{signed(st['mean'])} ± {fmt(st['sd'])}"


def findings(per_seed: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """:func:`finding` for every risk-aware policy (``rloo-*`` other than ``rloo-mean``), from the
    seed-level numbers ``per_seed[seed] = seed-<s>/eval/metrics.json``."""
    seeds = list(per_seed)
    if not seeds or "rloo-mean" not in per_seed[seeds[0]]["policies"]:
        return []
    out = []
    for name in per_seed[seeds[0]]["policy_order"]:
        if not name.startswith("rloo-") or name == "rloo-mean":
            continue
        pairs = {k: [(per_seed[sd]["policies"]["rloo-mean"][k], per_seed[sd]["policies"][name][k]) for sd in seeds]
                 for k in ("crr", "mean_rating")}
        out.append(finding(name, pairs["crr"], pairs["mean_rating"]))
    return out


def summary_table(summary: Mapping[str, Any]) -> str:
    """The policy table of :func:`aggregate`'s output, each cell ``mean ± sd`` over seeds."""
    head = "| " + " | ".join(["policy", *(h for _, h in POLICY_COLUMNS)]) + " |"
    rule = "|" + "---|" * (len(POLICY_COLUMNS) + 1)
    body = ["| " + " | ".join([name, *(fmt_pm(summary["policies"][name][k]) for k, _ in POLICY_COLUMNS)]) + " |"
            for name in summary["policy_order"]]
    return "\n".join([head, rule, *body])


def render(shared: Mapping[str, Any], per_seed: Mapping[int, Mapping[str, Any]], commands: Mapping[str, str],
           plots: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """The whole ``report.md``: ``shared`` is ``eval/metrics.json`` (world, feedback, reward models),
    ``per_seed[seed]`` each ``seed-<s>/eval/metrics.json``; ``commands`` maps a stage to the command
    that reproduces it; ``plots`` are ``(file name, caption)``."""
    w = shared["world"]
    seeds = list(per_seed)
    summary = aggregate(per_seed)
    n = len(seeds)
    parts = [
        "# prefcore demo report",
        "",
        f"Seeds {', '.join(map(str, seeds))} ({n} RLOO run{'s' if n != 1 else ''} per utility); world, feedback "
        f"and reward models shared, world seed {shared['world_seed']}"
        f"{' (quick mode)' if shared.get('quick') else ''}; {shared['threads']} torch threads; "
        f"prefcore {shared['version']}, torch {shared['torch']}.",
        "",
        "## The world",
        "",
        f"A tiny causal LM ({w['parameters']} parameters, vocabulary {w['vocab_size']}) pretrained for "
        f"{w['pretrain_steps']} steps on the synthetic language; its samples have mean length "
        f"{fmt(w['mean_length'])} tokens and {fmt(w['contentious_fraction'])} of them contain contentious "
        f"words. The simulated population has {w['num_types']} annotator types "
        f"(shares {', '.join(fmt(x) for x in w['type_weights'])}); the contentious behaviour is liked "
        f"mildly by most and strongly disliked by a minority of {fmt(w['minority_share'])}.",
        "",
        f"Feedback: {shared['feedback']['num_rated']} sampled responses rated by "
        f"{shared['feedback']['ratings_per_response']} annotators each (DFL style), and "
        f"{shared['feedback']['num_pairs']} pairwise vote records.",
        "",
        "## Policies on the true population",
        "",
        (f"Each cell is the mean ± sample standard deviation over the {n} seeds (per-seed tables below); "
         "each seed trains every policy with its own RLOO seed and evaluates all of them on its own "
         "held-out prompts and samples." if n > 1 else "One seed: no spread can be given."),
        "",
        summary_table(summary),
        "",
        *findings(per_seed),
        "",
        "## Reward models",
        "",
        "Shared by all seeds (trained once, world seed); calibration on the held-out feedback.",
        "",
        table(rm_rows(shared), RM_COLUMNS, ("model", "reward model")),
        "",
        "## What the numbers mean",
        "",
        MEANINGS,
        "## Plots",
        "",
    ]
    for name, caption in plots:
        parts += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    parts += ["## Per-seed policy tables", ""]
    for sd in seeds:
        parts += [f"### Seed {sd}", "", table(policy_rows(per_seed[sd]), POLICY_COLUMNS, ("policy", f"seed {sd}")), ""]
    if notes:
        parts += ["## Notes", "", *notes, ""]
    parts += ["## Reproduce each stage", "", "```bash"]
    parts += [f"# {stage}\n{cmd}" for stage, cmd in commands.items()]
    parts += ["```", ""]
    return "\n".join(parts)
