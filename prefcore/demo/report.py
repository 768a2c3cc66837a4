"""``report.md`` and the printed summary of ``prefcore demo``, built only from the numbers the
stages wrote to disk (``eval/metrics.json`` and the reward models' ``report.json``), so the report
cannot disagree with the metrics files. Every number is printed with :func:`fmt`."""
from __future__ import annotations

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


def findings(metrics: Mapping[str, Any]) -> list[str]:
    """Plain sentences comparing each risk-aware policy with the ``mean`` one, stating honestly
    where CRR did not fall or fell at a large cost in mean rating."""
    pols = metrics["policies"]
    base = pols.get("rloo-mean")
    if base is None:
        return []
    out = []
    for name in metrics["policy_order"]:
        p = pols[name]
        if not name.startswith("rloo-") or name == "rloo-mean":
            continue
        d_crr = p["crr"] - base["crr"]
        d_mean = p["mean_rating"] - base["mean_rating"]
        if d_crr < 0:
            cost = "at a large cost in mean rating" if d_mean < -0.1 else (
                "with a small cost in mean rating" if d_mean < 0 else "without lowering the mean rating")
            out.append(f"- `{name}` lowered CRR from {fmt(base['crr'])} to {fmt(p['crr'])} {cost} "
                       f"({fmt(base['mean_rating'])} → {fmt(p['mean_rating'])}).")
        else:
            out.append(f"- `{name}` did **not** lower CRR ({fmt(base['crr'])} → {fmt(p['crr'])}); "
                       f"mean rating {fmt(base['mean_rating'])} → {fmt(p['mean_rating'])}.")
    return out


def summary_table(metrics: Mapping[str, Any]) -> str:
    return table(policy_rows(metrics), POLICY_COLUMNS, ("policy", "policy"))


def render(metrics: Mapping[str, Any], commands: Mapping[str, str], plots: Sequence[tuple[str, str]],
           notes: Sequence[str] = ()) -> str:
    """The whole ``report.md``: ``metrics`` is ``eval/metrics.json``; ``commands`` maps a stage to the
    command that reproduces it; ``plots`` are ``(file name, caption)``."""
    w = metrics["world"]
    parts = [
        "# prefcore demo report",
        "",
        f"Seed {metrics['seed']}{' (quick mode)' if metrics.get('quick') else ''}; "
        f"{metrics['threads']} torch threads; prefcore {metrics['version']}, torch {metrics['torch']}.",
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
        f"Feedback: {metrics['feedback']['num_rated']} sampled responses rated by "
        f"{metrics['feedback']['ratings_per_response']} annotators each (DFL style), and "
        f"{metrics['feedback']['num_pairs']} pairwise vote records.",
        "",
        "## Policies on the true population",
        "",
        summary_table(metrics),
        "",
        *findings(metrics),
        "",
        "## Reward models",
        "",
        table(rm_rows(metrics), RM_COLUMNS, ("model", "reward model")),
        "",
        "## What the numbers mean",
        "",
        MEANINGS,
        "## Plots",
        "",
    ]
    for name, caption in plots:
        parts += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if notes:
        parts += ["## Notes", "", *notes, ""]
    parts += ["## Reproduce each stage", "", "```bash"]
    parts += [f"# {stage}\n{cmd}" for stage, cmd in commands.items()]
    parts += ["```", ""]
    return "\n".join(parts)
