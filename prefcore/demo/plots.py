"""The demo's figures (matplotlib, Agg backend: no display needed). Each function takes plain
numbers (lists/dicts read from the run's JSON files) and writes one PNG."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def rating_distributions(path: Path, panels: Sequence[Mapping]) -> None:
    """One panel per response: the true population CDF of its rating against the reward models'
    predicted CDFs. Each panel: ``{"title", "grid": [...], "true_cdf": [...],
    "predicted": {name: {"x": [...], "cdf": [...]}}}``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.plot(panel["grid"], panel["true_cdf"], color="black", lw=2.2, label="true population")
        for name, pred in panel["predicted"].items():
            ax.plot(pred["x"], pred["cdf"], lw=1.4, marker="." if name.startswith("qrm") else None,
                    label=f"{name} (predicted)")
        ax.axvline(-0.7, color="crimson", ls=":", lw=1)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("rating")
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("CDF")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(series: Sequence[Sequence[Sequence[float]]]) -> tuple[list[float], list[float]]:
    """The mean over seeds at the steps every seed logged: ``series[seed] = [[step, value], …]``."""
    per = [dict((p[0], p[1]) for p in pts) for pts in series if pts]
    if not per:
        return [], []
    steps = sorted(set.intersection(*(set(d) for d in per)))
    return steps, [sum(d[st] for d in per) / len(per) for st in steps]


def _step_panels(path: Path, curves: Mapping[str, Mapping[str, Mapping[str, Sequence[Sequence[float]]]]], *,
                 order: Callable[[str], object], title: Callable[[str], str], ylabel: str | None) -> None:
    """One panel per key, one colour per utility: a faint line per seed and, with several seeds,
    a bold line for their mean. ``curves[utility][seed][key] = [[step, value], …]`` over RLOO steps."""
    plt = _pyplot()
    keys = sorted({k for per_seed in curves.values() for per in per_seed.values() for k in per}, key=order)
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n, 3.3), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        for i, (utility, per_seed) in enumerate(curves.items()):
            colour = colours[i % len(colours)]
            series = [per.get(key, []) for per in per_seed.values()]
            several = sum(bool(pts) for pts in series) > 1
            for pts in series:
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8 if several else 1.3,
                            alpha=0.3 if several else 1.0, color=colour, label=None if several else utility)
            if several:
                steps, mean = _mean_curve(series)
                ax.plot(steps, mean, lw=1.6, color=colour, label=utility)
        ax.set_title(title(key), fontsize=9)
        ax.set_xlabel("RLOO step")
    if ylabel:
        axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Curves = Mapping[str, Mapping[str, Mapping[str, Sequence[Sequence[float]]]]]  # [utility][seed][key] → [[step, v]]


def left_tail_quantiles(path: Path, curves: Curves) -> None:
    """QRM Fig. 3: the reward model's predicted left-tail quantiles (τ ≤ 0.25) of the sampled
    completions over RLOO training, one panel per level, one faint line per seed and their mean.
    ``curves[utility][seed][tau] = [[step, value], …]``."""
    _step_panels(path, curves, order=float, title=lambda tau: f"predicted quantile τ = {tau}",
                 ylabel="reward-model quantile")


def risk_tradeoff(path: Path, points: Sequence[Mapping]) -> None:
    """DFL Table 3 as a picture: true mean rating against CRR per policy — a faint dot per seed and
    the mean with ± one sample standard deviation bars in both directions (with several seeds).
    ``points``: ``{"name", "mean_rating": [per seed], "crr": [per seed]}``."""
    import statistics

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(points):
        colour = colours[i % len(colours)]
        xs, ys = list(p["crr"]), list(p["mean_rating"])
        mx, my = statistics.mean(xs), statistics.mean(ys)
        if len(xs) > 1:
            ax.scatter(xs, ys, s=14, color=colour, alpha=0.35, linewidths=0)
            ax.errorbar([mx], [my], xerr=[statistics.stdev(xs)], yerr=[statistics.stdev(ys)], fmt="o", ms=5,
                        color=colour, capsize=3, lw=1.2)
        else:
            ax.scatter([mx], [my], s=36, color=colour)
        ax.annotate(p["name"], (mx, my), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("CRR (share of completions some type rates < −0.7 on average)", fontsize=9)
    ax.set_ylabel("true mean rating")
    ax.set_title("risk trade-off on the true population (mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(path: Path, curves: Curves) -> None:
    """Reward/utility and KL per RLOO step for each utility, per seed and their mean.
    ``curves[utility][seed][metric] = [[step, v], …]``."""
    _step_panels(path, curves, order=str, title=str, ylabel=None)
