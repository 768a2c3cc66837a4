"""Reward adapters: every kind of reward a user can bring, turned into one interface.

``RewardAdapter(prompts, completions) -> Scored`` scores completion *texts* (prompt repeated per
completion, TRL's convention) and returns the scalar utilities ``(B,)`` that enter the advantages,
the mean reward ``(B,)`` that is logged as ``reward``, and — when the reward is distributional —
the distribution, whose low quantiles are logged.

Kinds (:func:`make_reward`):

* a prefcore ``train-rm`` run directory (it holds ``heads.json``): :class:`RunScorer` gives a
  reward distribution, ``utility(dist)`` the scalar (bt runs give scalars directly);
* a local ``AutoModelForSequenceClassification`` directory: logit 0 of ``prompt + completion``;
* a Python callable ``f(prompts, completions, **kw)`` returning ``list[float]``, a ``(B,)``
  tensor, or a prefcore distribution; or ``"module:function"`` naming one;
* ``http://HOST:PORT`` (comma-separated for several): ``prefcore serve-rm`` servers
  (:class:`prefcore.serve.client.RemoteReward`), which return the distribution itself.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prefcore import distributions as D

Utility = Callable[[object], torch.Tensor]


@dataclass
class Scored:
    utility: torch.Tensor          # (B,) float32, what the advantages use
    reward: torch.Tensor           # (B,) float32, the distribution's mean (or the scalar reward)
    dist: object | None = None     # the reward distribution, when there is one


def _is_dist(x: object) -> bool:
    return isinstance(x, (D.QuantileDistribution, D.GaussianMixture))


def _check_finite(values: torch.Tensor, prompts: Sequence[str], completions: Sequence[str], what: str) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"reward: non-finite {what} {float(values[i])} for prompt {prompts[i]!r} "
                         f"(completion {completions[i]!r}; {bad.numel()} of {values.numel()} rows)")


class RewardAdapter:
    """Wraps ``score(prompts, completions, **kw)`` (returning scalars or a distribution) with the
    utility, the dtype/shape checks and the non-finite check naming the prompt."""

    def __init__(self, score: Callable, utility: Utility, utility_spec: str, name: str):
        self.score = score
        self.utility = utility
        self.utility_spec = utility_spec
        self.name = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kw) -> Scored:
        out = self.score(list(prompts), list(completions), **kw)
        b = len(prompts)
        if _is_dist(out):
            if tuple(out.batch_shape) != (b,):
                raise ValueError(f"reward {self.name}: the distribution has batch shape {tuple(out.batch_shape)}, "
                                 f"expected ({b},)")
            mean = out.mean().detach().float().cpu()
            _check_finite(mean, prompts, completions, "reward mean")
            util = self.utility(out).detach().float().cpu()
            _check_finite(util, prompts, completions, f"utility {self.utility_spec}")
            return Scored(util, mean, out)
        if isinstance(out, torch.Tensor):
            vals = out.detach().float().cpu().reshape(-1)
        else:
            try:
                vals = torch.tensor([float(v) for v in out], dtype=torch.float32)
            except (TypeError, ValueError):
                raise ValueError(f"reward {self.name}: expected a list of floats, a (B,) tensor or a prefcore "
                                 f"distribution, got {type(out).__name__}") from None
        if vals.numel() != b:
            raise ValueError(f"reward {self.name}: returned {vals.numel()} values for {b} completions")
        _check_finite(vals, prompts, completions, "reward")
        if self.utility_spec.strip() != "mean":
            raise ValueError(f"utility {self.utility_spec!r} needs a distributional reward, but reward {self.name} "
                             f"returns scalars (use utility=mean)")
        return Scored(vals, vals.clone(), None)


def _run_scorer(path: str) -> Callable:
    from prefcore.train.rm.scoring import RunScorer

    scorer = RunScorer.load(path)
    if scorer.backbone is None:
        raise ValueError(f"reward_model: the train-rm run {path!r} was trained on features (synthetic default), "
                         "so it cannot score texts; train it with --backbone")

    def score(prompts, completions, **kw):
        return scorer.reward_distribution(prompts, completions)

    return score


def _sequence_classifier(path: str, device: str) -> Callable:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        raise ValueError(f"reward_model: the tokenizer of {path!r} has no pad token")
    model.config.pad_token_id = tok.pad_token_id

    @torch.no_grad()
    def score(prompts, completions, **kw):
        enc = tok([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True, truncation=True)
        return model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float().cpu()

    return score


def reward_kind(spec: str) -> str:
    """What a reward string names, checked without loading anything: ``run`` (train-rm dir),
    ``seqcls`` (sequence classifier dir), ``http`` (serve-rm URLs) or ``callable`` (``module:function``)."""
    if spec.startswith(("http://", "https://")):
        from prefcore.serve.client import parse_urls

        parse_urls(spec)
        return "http"
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "heads.json")):
            return "run"
        cfg_path = os.path.join(spec, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                archs = json.load(f).get("architectures") or []
            if any(a.endswith("ForSequenceClassification") for a in archs):
                return "seqcls"
        raise ValueError(f"reward_model: {spec!r} is neither a prefcore train-rm run (no heads.json) nor an "
                         "AutoModelForSequenceClassification directory (config.json architectures)")
    if ":" in spec and not os.path.exists(spec):
        return "callable"
    raise FileNotFoundError(f"reward_model: no such directory {spec!r} (expected a train-rm run, a sequence "
                            "classifier, or 'module:function')")


def make_reward(reward: object, utility: Utility, utility_spec: str, *, device: str = "cpu") -> RewardAdapter:
    """The :class:`RewardAdapter` for ``reward`` (see the module docstring)."""
    if callable(reward) and not isinstance(reward, str):
        return RewardAdapter(reward, utility, utility_spec, getattr(reward, "__name__", type(reward).__name__))
    if not isinstance(reward, (str, os.PathLike)):
        raise ValueError(f"reward: expected a path, 'module:function' or a callable, got {type(reward).__name__}")
    spec = os.fspath(reward)
    kind = reward_kind(spec)
    if kind == "run":
        return RewardAdapter(_run_scorer(spec), utility, utility_spec, spec)
    if kind == "seqcls":
        return RewardAdapter(_sequence_classifier(spec, device), utility, utility_spec, spec)
    if kind == "http":
        from prefcore.serve.client import RemoteReward

        return RewardAdapter(RemoteReward(spec), utility, utility_spec, spec)
    mod, _, fn = spec.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward_model: cannot import {spec!r}: {exc}") from None
    if not callable(f):
        raise ValueError(f"reward_model: {spec!r} is not callable")
    return RewardAdapter(f, utility, utility_spec, spec)


def low_quantiles(dist: object, levels: Sequence[float] = (0.05, 0.1, 0.25)) -> dict[float, torch.Tensor]:
    """The distribution's quantiles at ``levels`` (each ``(B,)``), for the left-tail metrics."""
    dev = dist.values.device if isinstance(dist, D.QuantileDistribution) else dist.logits.device
    q = dist.quantile(torch.tensor(list(levels), dtype=torch.float64, device=dev)).detach().double().cpu()
    return {t: q[..., i] for i, t in enumerate(levels) if math.isfinite(t)}
