r"""``prefcore export-rm``: a ``train-rm`` run as a plain transformers ``AutoModelForSequenceClassification``.

The exported directory loads with ``AutoModelForSequenceClassification.from_pretrained(HF_DIR)`` —
no prefcore import, no ``trust_remote_code`` — so TRL (``reward_funcs="HF_DIR"``, reads
``logits[:, 0]``), OpenRLHF (``value_head_prefix=score``) and verl/vLLM ``/classify`` use it as it is.

What can be exported, and why. A sequence-classification model computes ``logits = W·h + b`` on the
pooled last-token state ``h`` of its backbone, so only a reward that is *linear in h* fits:

* ``bt`` / ``bt-margin`` with ``trunk_layers = 0``: the scalar head's row → ``num_labels = 1``.
* ``qrm`` with ``trunk_layers = 0``, one attribute (the gate of one attribute is the constant 1),
  plain (not ``non_crossing``) heads: the Q quantile heads are rows ``W_q·h + b_q``, and any risk
  functional *linear in the quantiles* of the piecewise-linear quantile function
  (:class:`prefcore.distributions.QuantileDistribution`) is a fixed weighted sum ``Σ_q a_q v_q``
  (:func:`quantile_weights`: the mean, ``cvar:α``, ``quantile:τ``), so its score row is
  ``Σ_q a_q W_q`` with bias ``Σ_q a_q b_q`` → ``num_labels = 1``; ``--all_quantiles`` appends the
  Q quantile rows (``num_labels = Q + 1``: the utility first, then the quantiles; the levels are in
  ``config.json`` under ``prefcore_export``).

Refused, each with the reason: an MLP trunk (``trunk_layers > 0``: GELU is not linear), ``gmm`` and
``mean-var`` (the mean of a mixture is ``Σ softmax(ℓ)·μ``, a product of two heads), ``qrm`` with
several attributes (the gate depends on the prompt), ``non_crossing`` heads (softplus increments),
and the utilities ``ce:λ`` (a log-sum-exp of the quantiles) and ``mean-var:α`` (their square).

Exactness: prefcore sorts crossing quantiles before applying a utility; the exported row applies
the weights to the heads' outputs in level order, so the two agree wherever the predicted
quantiles do not cross (check ``--all_quantiles`` outputs if in doubt).

Bias: when the architecture's ``score`` layer has no bias (Llama, Mistral, Qwen2, GPT-2 …) the
head's bias cannot be folded into the backbone; ``--drop_bias`` exports without it and records it
as ``prefcore_export.logit_shift`` (one value per label: add it to recover prefcore's numbers;
rankings, BT probabilities and group-normalised RL advantages do not change). Without
``--drop_bias`` such an export is refused.

Text: the model scores the text the run was trained on, ``prompt + "\n\n" + response``
(:func:`prefcore.train.rm.sources.response_text`); truncation keeps the end (``truncation_side``
left, saved with the tokenizer).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prefcore.utility import Utility, parse_utility

LINEAR_UTILITIES = ("mean", "cvar", "quantile")


@dataclass
class ExportRMConfig:
    """Settings of ``prefcore export-rm RUN_DIR --out HF_DIR``."""

    run_dir: str = field(metadata={"help": "a finished train-rm run directory (bt, bt-margin or qrm on text)"})
    out: str = field(metadata={"help": "the new AutoModelForSequenceClassification directory (must not exist)"})
    utility: str = field(default="mean", metadata={"help": "qrm: the exported score, linear in the quantiles: "
                                                           "mean | cvar:α | quantile:τ"})
    all_quantiles: bool = field(default=False, metadata={"help": "qrm: also export the Q quantiles "
                                                                 "(num_labels = Q + 1, utility first)"})
    drop_bias: bool = field(default=False, metadata={"help": "export to a score layer without bias, recording "
                                                             "the head's bias as prefcore_export.logit_shift"})

    def __post_init__(self) -> None:
        self.parsed_utility = parse_utility(self.utility, setting="--utility")
        if self.parsed_utility.kind not in LINEAR_UTILITIES:
            why = ("the certainty equivalent is a log-sum-exp of the quantiles" if self.parsed_utility.kind == "ce"
                   else "mean − α·Var contains the square of the quantiles")
            raise ValueError(f"--utility {self.utility!r} cannot be exported as one linear score row: {why}; "
                             f"use one linear in the quantiles (mean, cvar:α, quantile:τ)")
        if os.path.lexists(self.out):
            raise FileExistsError(f"--out {self.out!r} already exists; export into a new directory")


# ---- the linear functionals of the piecewise-linear quantile function ---------------------------

def quantile_weights(taus: Sequence[float], utility: Utility | str) -> torch.Tensor:
    r"""Weights ``a (Q,)`` float64 with ``u(dist) = Σ_q a_q v_q`` for a quantile set ``v`` (sorted)
    at levels ``taus`` and a utility ``u`` linear in the quantiles (``mean``, ``cvar:α``,
    ``quantile:τ``), for the piecewise-linear quantile function of
    :class:`~prefcore.distributions.QuantileDistribution`.

    Derivation. The knots are ``k = K v`` at levels ``u = (0, τ_1, …, τ_Q, 1)``: ``k_q = v_q`` inside,
    and the two end knots extrapolate the first/last segment, ``k_0 = v_1 − τ_1 s_1`` with
    ``s_1 = (v_2 − v_1)/(τ_2 − τ_1)`` and ``k_{Q+1} = v_Q + (1 − τ_Q) s_Q`` (``s = 0`` when Q = 1).
    ``quantile:τ`` interpolates the two knots around τ. ``cvar:α = (1/α)∫_0^α F^{-1}`` sums
    trapezoids: on segment ``[u_i, u_{i+1}]`` cut at ``b = min(u_{i+1}, α)``, with ``L = b − u_i``
    and ``λ = L/(u_{i+1} − u_i)``, the integral is ``L·((2 − λ)k_i + λ k_{i+1})/2``. The mean is
    ``cvar:1``. Then ``a = (weights on k) · K``."""
    u_spec = parse_utility(utility)
    if u_spec.kind not in LINEAR_UTILITIES:
        raise ValueError(f"utility {str(u_spec)!r} is not linear in the quantiles (linear: mean, cvar:α, quantile:τ)")
    t = torch.tensor([float(x) for x in taus], dtype=torch.float64)
    q = t.numel()
    if q < 1 or not bool(((t > 0) & (t < 1)).all()) or (q > 1 and not bool((t[1:] > t[:-1]).all())):
        raise ValueError(f"taus must be strictly increasing inside (0, 1), got {t.tolist()}")
    knots = torch.zeros(q + 2, q, dtype=torch.float64)
    knots[1: q + 1] = torch.eye(q, dtype=torch.float64)
    if q > 1:
        c = t[0] / (t[1] - t[0])
        knots[0, 0], knots[0, 1] = 1 + c, -c
        d = (1 - t[-1]) / (t[-1] - t[-2])
        knots[-1, -1], knots[-1, -2] = 1 + d, -d
    else:
        knots[0, 0] = knots[-1, 0] = 1.0
    levels = torch.cat([t.new_zeros(1), t, t.new_ones(1)])
    a = torch.zeros(q + 2, dtype=torch.float64)
    if u_spec.kind == "quantile":
        tau = float(u_spec.param)
        i = int(torch.searchsorted(levels, torch.tensor([tau], dtype=torch.float64), right=True)) - 1
        i = min(max(i, 0), q)
        lam = (tau - levels[i]) / (levels[i + 1] - levels[i])
        a[i] += 1 - lam
        a[i + 1] += lam
    else:
        alpha = 1.0 if u_spec.kind == "mean" else float(u_spec.param)
        for i in range(q + 1):
            lo, hi = float(levels[i]), float(levels[i + 1])
            if alpha <= lo:
                break
            length = min(hi, alpha) - lo
            lam = length / (hi - lo)
            a[i] += length * (2 - lam) / 2 / alpha
            a[i + 1] += length * lam / 2 / alpha
    return a @ knots


# ---- the export ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreRows:
    """The exported linear score layer: ``weight (L, D)``, ``bias (L,)`` (float64) and the labels."""

    weight: torch.Tensor
    bias: torch.Tensor
    labels: list[str]
    levels: list[float] | None


def score_rows(heads, head_cfg: dict, utility: Utility, all_quantiles: bool) -> ScoreRows:
    """The rows of the score layer equal to the run's reward (see the module docstring), or a
    ``ValueError`` saying why the run's reward is not linear in the pooled state."""
    method = head_cfg["method"]
    if head_cfg.get("trunk_layers", 0) > 0:
        raise ValueError(f"this run has an MLP trunk (trunk_layers={head_cfg['trunk_layers']}): Linear+GELU layers are "
                         "not linear in the pooled state, so no single score layer computes its reward; train with "
                         "--trunk_layers 0 to export")
    if method == "gmm":
        raise ValueError("a gmm run cannot be exported as a linear score: its mean is Σ_k softmax(logits)_k·μ_k, a "
                         "product of two heads' outputs, and its risk utilities are non-linear too; export a bt or "
                         "one-attribute qrm run (trunk_layers 0)")
    if method == "mean-var":
        raise ValueError("a mean-var run cannot be exported as a linear score: its risk utilities need the variance "
                         "head's exp(log_var); export a bt or one-attribute qrm run (trunk_layers 0)")
    if method in ("bt", "bt-margin"):
        if not utility.is_risk_neutral or utility.kind != "mean":
            raise ValueError(f"--utility {str(utility)!r}: a {method} run gives one scalar reward; only 'mean' applies")
        if all_quantiles:
            raise ValueError(f"--all_quantiles: a {method} run has no quantiles")
        lin = heads["scalar"].linear
        return ScoreRows(lin.weight.detach().double().clone(), lin.bias.detach().double().clone(), ["reward"], None)
    if method != "qrm":
        raise ValueError(f"unknown method {method!r} in heads.json")
    if head_cfg.get("num_attributes", 1) != 1:
        raise ValueError(f"this qrm run has {head_cfg['num_attributes']} attributes mixed by a gate that depends on the "
                         "prompt (a softmax of prompt features), which no fixed score row computes; export a "
                         "one-attribute qrm run")
    if head_cfg.get("non_crossing"):
        raise ValueError("this qrm run uses non_crossing heads (softplus increments), which are not linear in the "
                         "pooled state; export a run trained without --non_crossing")
    qh = heads["quantile"]
    taus = [float(x) for x in qh.taus.tolist()]
    w_q, b_q = qh.linear.weight.detach().double(), qh.linear.bias.detach().double()  # (Q, D), (Q,)
    a = quantile_weights(taus, utility)
    weight, bias, labels = (a @ w_q)[None], (a @ b_q)[None], [f"utility:{utility}"]
    if all_quantiles:
        weight, bias = torch.cat([weight, w_q]), torch.cat([bias, b_q])
        labels += [f"quantile:{t:g}" for t in taus]
    return ScoreRows(weight, bias, labels, taus)


def _run_backbone(run_dir: str) -> str:
    from prefcore.train.rm.rmdir import stored_backbone

    path = stored_backbone(run_dir)
    if path is None:
        with open(os.path.join(run_dir, "config.json")) as f:
            path = json.load(f).get("backbone")
    if path is None:
        raise ValueError(f"run_dir {run_dir!r} was trained on features (synthetic default): there is no backbone to export")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"run_dir {run_dir!r}: its backbone {path!r} no longer exists and the run holds no "
                                "backbone/ copy")
    return path


def export_reward_model(cfg: ExportRMConfig) -> str:
    """Write ``cfg.out`` (see the module docstring); returns it. All checks run before any model is
    loaded; the directory is written into a temporary sibling and renamed into place when complete."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from prefcore.train.rm.sources import load_text_encoder
    from prefcore.train.rm.trainer import load_heads

    for f in ("config.json", "heads.json", "heads.safetensors"):
        if not os.path.isfile(os.path.join(cfg.run_dir, f)):
            raise FileNotFoundError(f"run_dir {cfg.run_dir!r} has no {f} (a finished `prefcore train-rm` run is needed)")
    heads, head_cfg = load_heads(cfg.run_dir)
    rows = score_rows(heads, head_cfg, cfg.parsed_utility, cfg.all_quantiles)
    backbone_path = _run_backbone(cfg.run_dir)
    hf_cfg = AutoConfig.from_pretrained(backbone_path, local_files_only=True)
    try:
        model_cls = AutoModelForSequenceClassification._model_mapping[type(hf_cfg)]
    except KeyError:
        raise ValueError(f"the backbone's architecture ({hf_cfg.model_type}) has no AutoModelForSequenceClassification "
                         "class in transformers, so it cannot be exported") from None
    backbone, tokenizer = load_text_encoder(backbone_path)
    hf_cfg.num_labels = len(rows.labels)
    hf_cfg.id2label = dict(enumerate(rows.labels))
    hf_cfg.label2id = {v: k for k, v in hf_cfg.id2label.items()}
    hf_cfg.architectures = [model_cls.__name__]
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the backbone's tokenizer ({backbone_path!r}) has neither a pad nor an EOS token; the "
                             "classifier needs a pad id to find each row's last token")
        tokenizer.pad_token = tokenizer.eos_token  # the pooled token is the last non-pad one, as in prefcore
        print(f"prefcore export-rm: the tokenizer has no pad token; using EOS ({tokenizer.eos_token!r})")
    hf_cfg.pad_token_id = tokenizer.pad_token_id
    torch_dtype = next(backbone.parameters()).dtype
    model = model_cls(hf_cfg).to(torch_dtype).eval()
    base = getattr(model, model.base_model_prefix, None)
    score = getattr(model, "score", None)
    if base is None or not isinstance(score, torch.nn.Linear):
        raise ValueError(f"{model_cls.__name__} does not classify with one linear 'score' layer on the last token, so "
                         "prefcore's last-token heads cannot be placed in it")
    missing, unexpected = base.load_state_dict(backbone.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"the backbone's weights do not fit {model_cls.__name__}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    shift = None
    with torch.no_grad():
        score.weight.copy_(rows.weight.to(score.weight.dtype))
        if score.bias is not None:
            score.bias.copy_(rows.bias.to(score.bias.dtype))
        elif bool((rows.bias != 0).any()):
            if not cfg.drop_bias:
                raise ValueError(f"{model_cls.__name__}'s score layer has no bias, so the head's bias "
                                 f"({rows.bias[0].item():.6g} for the first label) cannot be folded in; pass "
                                 "--drop_bias to export without it (recorded as prefcore_export.logit_shift)")
            shift = [float(b) for b in rows.bias]
    hf_cfg.prefcore_export = {"source_run": os.path.abspath(cfg.run_dir), "method": head_cfg["method"],
                              "utility": str(cfg.parsed_utility), "labels": rows.labels, "levels": rows.levels,
                              "logit_shift": shift, "text_format": "prompt + '\\n\\n' + response"}
    model.config = hf_cfg
    tokenizer.truncation_side = "left"
    _write_dir(cfg.out, lambda tmp: (model.save_pretrained(tmp, safe_serialization=True), tokenizer.save_pretrained(tmp)))
    print(f"prefcore export-rm [{head_cfg['method']}, {cfg.parsed_utility}] → {cfg.out} ({model_cls.__name__}, "
          f"num_labels={len(rows.labels)}{', logit_shift recorded' if shift else ''})")
    return cfg.out


def _write_dir(final: str, fill) -> None:
    """``fill(tmp)`` into a temporary sibling of ``final``, then rename it onto ``final``."""
    final = os.path.abspath(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fill(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
