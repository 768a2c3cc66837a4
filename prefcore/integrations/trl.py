r"""A prefcore reward model as a TRL reward function.

>>> from trl import RLOOConfig, RLOOTrainer
>>> from prefcore.integrations.trl import reward_function
>>> reward = reward_function("runs/rm-qrm", utility="ce:2")        # risk-averse, QRM eq. 4
>>> trainer = RLOOTrainer(model="my-policy", reward_funcs=reward, args=RLOOConfig(...), train_dataset=ds)

The callable follows TRL's ``reward_funcs`` convention, ``f(prompts, completions, **kwargs) ->
list[float]`` with a ``__name__`` (TRL logs ``rewards/<name>/mean``): the finished
``prefcore train-rm`` run in ``run_dir`` (a run on text, trained with ``--backbone``) predicts the
reward *distribution* of each (prompt, completion) through :class:`prefcore.train.rm.RunScorer`,
and the utility (:func:`prefcore.utility.parse_utility`: ``mean``, ``ce:λ``, ``mean-var:α``,
``cvar:α``, ``quantile:τ``) turns it into one number. A Bradley–Terry run only supports ``mean``.

TRL passes either plain texts or, for conversational data, lists of ``{"role", "content"}``
messages; :func:`message_text` turns those into the text the reward model was trained on
(``prompt`` and ``response`` fields of prefcore's schemas), and ``to_text=`` replaces that rule
(e.g. with a chat template). This module does not import TRL.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prefcore.utility import Utility, parse_utility

__all__ = ["RewardFunction", "reward_function", "message_text"]


def message_text(x: Any, *, name: str = "text", index: int = 0) -> str:
    """``x`` if it is a string; for TRL's conversational format (a list of ``{"role", "content"}``
    messages) the messages' contents joined by a blank line (``"\\n\\n"``). Anything else raises
    ``TypeError`` naming ``name[index]``."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict) and isinstance(x.get("content"), str):
        return x["content"]
    if isinstance(x, (list, tuple)) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in x):
        return "\n\n".join(m["content"] for m in x)
    raise TypeError(f"{name}[{index}] must be a string or a list of {{'role', 'content'}} messages, got {type(x).__name__}")


class RewardFunction:
    """A callable reward in TRL's convention; build it with :func:`reward_function`.

    ``scorer``: a loaded :class:`~prefcore.train.rm.RunScorer` on text; ``utility``: a
    :class:`~prefcore.utility.Utility`; ``batch_size``: texts scored per backbone pass;
    ``to_text(x, name=, index=)``: how prompts/completions (texts or message lists) become text.
    ``__name__`` defaults to ``"prefcore_<method>_<utility>"`` (e.g. ``prefcore_qrm_ce:2``)."""

    def __init__(self, scorer, utility: Utility, *, batch_size: int = 64, name: str | None = None,
                 to_text: Callable[..., str] = message_text) -> None:
        self.scorer = scorer
        self.utility = utility
        self.batch_size = batch_size
        self.to_text = to_text
        self.__name__ = name or f"prefcore_{scorer.head_config['method']}_{utility}"

    def distribution(self, prompts: Sequence[Any], completions: Sequence[Any]):
        """The reward model's predicted distribution of the batch (as :meth:`RunScorer.reward_distribution`)."""
        p, c = self._texts(prompts, completions)
        return self.scorer.reward_distribution(p, c)

    def scores(self, prompts: Sequence[Any], completions: Sequence[Any]) -> torch.Tensor:
        """Utilities ``(B,)`` float32 of the batch, scored ``batch_size`` texts at a time."""
        p, c = self._texts(prompts, completions)
        out = []
        with torch.no_grad():
            for s in range(0, len(p), self.batch_size):
                dist = self.scorer.reward_distribution(p[s: s + self.batch_size], c[s: s + self.batch_size])
                out.append(self.utility(dist).reshape(-1).float())
        r = torch.cat(out) if out else torch.zeros(0)
        bad = (~torch.isfinite(r)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{self.__name__}: the reward model gave a non-finite utility ({float(r[i])}) for "
                             f"prompts[{i}] = {p[i][:80]!r}")
        return r

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """TRL's ``reward_funcs`` entry point: one float per (prompt, completion); extra keyword
        arguments TRL passes (``completion_ids``, ``trainer_state``, dataset columns, …) are ignored."""
        return [float(x) for x in self.scores(prompts, completions).tolist()]

    def _texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[str], list[str]]:
        for name, v in (("prompts", prompts), ("completions", completions)):
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise TypeError(f"{name} must be a list (one entry per completion), got {type(v).__name__}")
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}")
        return ([self.to_text(x, name="prompts", index=i) for i, x in enumerate(prompts)],
                [self.to_text(x, name="completions", index=i) for i, x in enumerate(completions)])

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, utility={str(self.utility)!r})"


def reward_function(run_dir: str | os.PathLike[str], utility: str | Utility = "mean", *, backbone: str | None = None,
                    device: str = "cpu", batch_size: int = 64, name: str | None = None,
                    to_text: Callable[..., str] = message_text) -> RewardFunction:
    """A TRL ``reward_funcs`` callable from the finished ``prefcore train-rm`` run in ``run_dir``.

    ``utility``: ``mean | ce:λ | mean-var:α | cvar:α | quantile:τ`` (:func:`prefcore.utility.parse_utility`)
    or a :class:`~prefcore.utility.Utility`; ``backbone``: overrides the run's ``--backbone`` path
    (a local directory); ``device``: where the backbone runs; ``batch_size``: texts per backbone
    pass; ``name``: the ``__name__`` TRL logs under; ``to_text``: see :func:`message_text`.

    Errors (before any model is loaded where possible): ``ValueError`` for a bad ``utility``
    (naming it), a ``bt``/``bt-margin`` run with a utility other than ``mean``, a run trained on the
    synthetic feature default (no backbone to embed text with), a non-positive ``batch_size``;
    ``FileNotFoundError`` for a ``run_dir`` without a finished run.
    """
    u = parse_utility(utility, setting="utility")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    run_dir = os.fspath(run_dir)
    for f in ("config.json", "heads.json", "heads.safetensors"):
        if not os.path.isfile(os.path.join(run_dir, f)):
            raise FileNotFoundError(f"run_dir: {run_dir!r} has no {f} (a finished `prefcore train-rm` run is needed)")
    with open(os.path.join(run_dir, "heads.json")) as f:
        method = json.load(f).get("method")
    with open(os.path.join(run_dir, "config.json")) as f:
        has_backbone = backbone is not None or json.load(f).get("backbone") is not None
    if method in ("bt", "bt-margin") and not u.is_risk_neutral:
        raise ValueError(f"utility: {str(u)!r} needs a distributional reward model, but {run_dir!r} is a {method} "
                         "run (one scalar per response): use utility='mean', or train qrm/gmm/mean-var")
    if not has_backbone:
        raise ValueError(f"run_dir: {run_dir!r} was trained on features (the synthetic default), so it cannot score "
                         "text; train it on text with --backbone, or pass backbone=")
    from prefcore.train.rm.scoring import RunScorer

    scorer = RunScorer.load(run_dir, backbone=backbone, device=device)
    return RewardFunction(scorer, u, batch_size=batch_size, name=name, to_text=to_text)
