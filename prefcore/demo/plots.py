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


def _step_panels(path: Path, curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], *,
                 order: Callable[[str], object], title: Callable[[str], str], ylabel: str | None) -> None:
    """One panel per key of the inner mappings (sorted by ``order``), one line per utility:
    ``curves[utility][key] = [[step, value], …]`` over RLOO steps."""
    plt = _pyplot()
    keys = sorted({k for per in curves.values() for k in per}, key=order)
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n, 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for utility, per in curves.items():
            pts = per.get(key, [])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.3, label=utility)
        ax.set_title(title(key), fontsize=9)
        ax.set_xlabel("RLOO step")
    if ylabel:
        axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def left_tail_quantiles(path: Path, curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]]) -> None:
    """QRM Fig. 3: the reward model's predicted left-tail quantiles (τ ≤ 0.25) of the sampled
    completions over RLOO training, one panel per level. ``curves[utility][tau] = [[step, value], …]``."""
    _step_panels(path, curves, order=float, title=lambda tau: f"predicted quantile τ = {tau}",
                 ylabel="reward-model quantile")


def risk_tradeoff(path: Path, points: Sequence[Mapping]) -> None:
    """DFL Table 3 as a picture: true mean rating against CRR, one point per policy.
    ``points``: ``{"name", "mean_rating", "crr"}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    for p in points:
        ax.scatter([p["crr"]], [p["mean_rating"]], s=36)
        ax.annotate(p["name"], (p["crr"], p["mean_rating"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("CRR (share of completions some annotator type rates < −0.7 on average)")
    ax.set_ylabel("true mean rating")
    ax.set_title("risk trade-off on the true population", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(path: Path, curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]]) -> None:
    """Reward/utility and KL per RLOO step for each utility. ``curves[utility][metric] = [[step, v], …]``."""
    _step_panels(path, curves, order=str, title=str, ylabel=None)
