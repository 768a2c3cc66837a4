"""Reward-model training on frozen features: Bradley–Terry (plain and vote-margin), QRM, GMM and
mean-variance heads, with resumable checkpoints, JSONL metrics and an evaluation report.

The frozen-backbone path is what QRM does: pooled features of every text are extracted once
(:mod:`prefcore.train.rm.features`, cached under ``OUT/features``) and only the heads are trained.
The embedded synthetic default (:mod:`prefcore.data.synthetic`) provides features directly.

Methods (``TrainRMConfig.method``) and the data each needs:

===========  ========================================================================================
``bt``        pairs; ``ScalarHead`` with ``−log σ(r_c − r_r)``
``bt-margin`` pairs with votes; ``−log σ(r_c − r_r − m)``, ``m = |Σ j − n/2|/(n/2)``
``qrm``       ratings/attributes (stage 1: ``QuantileHead`` with the fused pinball loss), then pairs
              with prompt features (stage 2: ``GatingNetwork`` with BT on ``Σ_m g_m·E[Q_m]``, heads frozen)
``gmm``       ratings; ``GMMHead`` with the fused ``gmm_nll`` — on the raw scores (``gmm_target=scores``),
              or on a grid target from ``fit_gmm_em`` (``em``) or ``grid_histogram`` (``histogram``)
``mean-var``  ratings; ``MeanVarianceHead`` with the Gaussian NLL of the scores
===========  ========================================================================================
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prefcore._io import atomic_save_safetensors, atomic_write_json
from prefcore.train.distributed import launched_world_size
from prefcore.train.loop import METRICS, LoopConfig, MetricsLog, load_checkpoint, run_stage
from prefcore.train.rm.sources import DATA_FORMATS, PAIR_FORMATS

from prefcore.data.batching import TOO_LONG
from prefcore.models.packing import PACKING

METHODS = ("bt", "bt-margin", "qrm", "gmm", "mean-var")
FINETUNE = ("none", "lora", "full")
FINETUNE_METHODS = METHODS  # the methods --finetune lora|full trains today
SCHEDULERS = ("linear", "cosine", "constant")
GMM_TARGETS = ("scores", "em", "histogram")


@dataclass
class TrainRMConfig:
    """Configuration of ``prefcore train-rm`` (flags, or a JSON/YAML file with these keys)."""

    method: str = field(metadata={"help": "the reward model to train", "choices": METHODS})
    data: str = field(default="synthetic", metadata={"help": "'synthetic' (embedded simulated population) or a "
                                                              "JSONL/Parquet file of ratings, attributes or pairs"})
    pairs: str | None = field(default=None, metadata={"help": "qrm only: JSONL/Parquet pairs for the gating stage"})
    data_format: str = field(default="prefcore", metadata={"help": "layout of --data: prefcore's schemas, or a public "
                                                                   "source's (see prefcore.data adapters)",
                                                           "choices": DATA_FORMATS})
    pairs_format: str = field(default="prefcore", metadata={"help": "layout of --pairs", "choices": PAIR_FORMATS})
    attributes: str | None = field(default=None, metadata={"help": "comma-separated attribute columns: --data holds "
                                                                   "attribute records (qrm)"})
    score_range: str = field(default="-1,1", metadata={"help": "declared score range 'lo,hi' of ratings/attributes"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip (and count) invalid rows instead of failing"})
    backbone: str | None = field(default=None, metadata={"help": "local path of a transformers AutoModel (text data)"})
    max_length: int = field(default=256, metadata={"help": "tokens per text for feature extraction"})
    feature_batch_size: int = field(default=16, metadata={"help": "batch size of feature extraction"})
    feature_shard_size: int = field(default=4096, metadata={"help": "texts per feature-cache shard (the unit of "
                                                                     "resumption and of the split across torchrun ranks)"})
    device: str = field(default="cpu", metadata={"help": "device of the backbone: feature extraction, or where "
                                                              "--finetune trains (cuda = the LOCAL_RANK GPU)"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/rm-<method>)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})
    steps: int = field(default=600, metadata={"help": "optimisation steps (stage 1)"})
    gate_steps: int = field(default=300, metadata={"help": "qrm: steps of the gating stage"})
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    eval_fraction: float = field(default=0.2, metadata={"help": "held-out fraction for the evaluation report"})
    num_items: int = field(default=4000, metadata={"help": "synthetic: number of rated items"})
    num_pairs: int = field(default=4000, metadata={"help": "synthetic: number of preference pairs"})
    k: int = field(default=3, metadata={"help": "gmm: mixture components"})
    gmm_target: str = field(default="scores", metadata={"help": "gmm: fit raw scores, or a grid density from EM or a KDE",
                                                         "choices": GMM_TARGETS})
    grid_size: int = field(default=201, metadata={"help": "gmm em/histogram: grid points over the score range"})
    bandwidth: float = field(default=0.1, metadata={"help": "gmm histogram: KDE bandwidth"})
    trunk_layers: int = field(default=2, metadata={"help": "MLP layers (Linear+GELU) before the heads; 0 = linear "
                                                           "heads on the frozen features (QRM)"})
    trunk_width: int = field(default=128, metadata={"help": "width of the trunk layers"})
    non_crossing: bool = field(default=False, metadata={"help": "qrm: monotone quantile parametrisation"})
    risk_lambda: float = field(default=2.0, metadata={"help": "report: λ of the certainty equivalent"})
    risk_alpha: float = field(default=0.1, metadata={"help": "report: α of CVaR/VaR"})
    progress: bool = field(default=True, metadata={"help": "show tqdm progress bars"})
    # ---- fine-tuning the backbone with the head (--finetune lora|full; TRL's names) ----------------
    finetune: str = field(default="none", metadata={"help": "none: heads on frozen features (above); lora or full: "
                                                            "train the backbone with the head from text pairs",
                                                    "choices": FINETUNE})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "finetune: pairs per optimizer micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "finetune: micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-5, metadata={"help": "finetune: learning rate of the backbone (or LoRA)"})
    head_learning_rate: float = field(default=1e-3, metadata={"help": "finetune: learning rate of the reward head"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "finetune: epochs (when max_steps is -1)"})
    max_steps: int = field(default=-1, metadata={"help": "finetune: optimizer steps (-1: from num_train_epochs)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "finetune: share of the steps with a linear warm-up"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "finetune: decay after warm-up",
                                                                 "choices": SCHEDULERS})
    max_grad_norm: float = field(default=1.0, metadata={"help": "finetune: gradient clipping (0 = off)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "finetune: recompute activations in backward"})
    bf16: bool = field(default=False, metadata={"help": "finetune: bf16 autocast forward, fp32 weights"})
    disable_dropout: bool = field(default=True, metadata={"help": "finetune: set every dropout probability to 0"})
    center_rewards_coefficient: float | None = field(default=None, metadata={
        "help": "finetune: weight of the mean squared reward (TRL's centering term; bt, bt-margin)"})
    lora_r: int = field(default=16, metadata={"help": "finetune lora: rank"})
    lora_alpha: int = field(default=32, metadata={"help": "finetune lora: scale numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "finetune lora: dropout on the LoRA input"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "finetune lora: 'all-linear' or a "
                                                                             "comma-separated list of module names"})
    packing: str = field(default="auto", metadata={"help": "finetune: packed (pairs: prompt encoded once; rated texts: several per row), "
                                                           "plain (one padded row per sequence) or auto", "choices": PACKING})
    fsdp: bool = field(default=False, metadata={"help": "finetune under torchrun: shard the backbone with FSDP2 "
                                                        "(fully_shard per decoder layer); without it, DDP"})
    too_long: str = field(default="truncate", metadata={"help": "finetune: a pair over max_length is truncated "
                                                                "(prompt cut from the left) or dropped",
                                                        "choices": TOO_LONG})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.gmm_target not in GMM_TARGETS:
            raise ValueError(f"gmm_target must be one of {GMM_TARGETS}, got {self.gmm_target!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")
        for name, low in (("k", 1), ("grid_size", 2), ("max_length", 1), ("feature_batch_size", 1),
                          ("feature_shard_size", 1),
                          ("num_items", 2), ("num_pairs", 2), ("gate_steps", 1), ("trunk_layers", 0),
                          ("trunk_width", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0.0 < self.risk_alpha <= 1.0:
            raise ValueError(f"risk_alpha must lie in (0, 1], got {self.risk_alpha}")
        if not math.isfinite(self.risk_lambda):
            raise ValueError(f"risk_lambda must be finite, got {self.risk_lambda}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth}")
        lo, hi = self.range
        if not lo < hi:
            raise ValueError(f"score_range must be 'lo,hi' with lo < hi, got {self.score_range!r}")
        if self.out is None:
            self.out = os.path.join("runs", f"rm-{self.method}")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"out must name a run directory, but {self.out!r} is an existing file")
        self.loop_config(self.steps)  # validates the optimisation settings
        check_finetune_settings(self)

    @property
    def range(self) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in self.score_range.split(","))
        except ValueError:
            raise ValueError(f"score_range must be 'lo,hi' (two numbers), got {self.score_range!r}") from None
        return lo, hi

    def loop_config(self, steps: int) -> LoopConfig:
        return LoopConfig(steps=steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                          warmup_steps=min(self.warmup_steps, max(0, steps - 1)), seed=self.seed,
                          log_every=self.log_every, checkpoint_every=self.checkpoint_every)


def check_finetune_settings(cfg: TrainRMConfig) -> None:
    """The fine-tuning settings, checked before any model loads (one-line errors)."""
    for name, choices in (("finetune", FINETUNE), ("lr_scheduler_type", SCHEDULERS), ("packing", PACKING),
                          ("too_long", TOO_LONG)):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    if cfg.fsdp and cfg.finetune == "none":
        raise ValueError("--fsdp shards a backbone being fine-tuned: use it with --finetune lora|full")
    if cfg.finetune == "none":
        return
    if not (cfg.device == "cpu" or cfg.device == "cuda" or cfg.device.startswith("cuda:")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' for --finetune, got {cfg.device!r}")
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available (use --device cpu)")
    if cfg.fsdp and launched_world_size() < 2:
        raise ValueError("--fsdp needs a torchrun launch with >= 2 processes (torchrun --nproc-per-node N "
                         "prefcore train-rm --finetune … --fsdp true)")
    if cfg.method not in FINETUNE_METHODS:
        raise ValueError(f"--finetune {cfg.finetune} trains {', '.join(FINETUNE_METHODS)} today; method "
                         f"{cfg.method!r} trains its heads on frozen features (--finetune none)")
    if cfg.method == "qrm" and cfg.pairs is None:
        raise ValueError("method 'qrm' needs --pairs (a pairs file) for its gating stage")
    if cfg.data == "synthetic" or cfg.backbone is None:
        raise ValueError(f"--finetune {cfg.finetune} trains a backbone on text: pass --backbone (a local transformers "
                         "model) and --data (a JSONL/Parquet file of pairs or ratings)")
    for name, low in (("per_device_train_batch_size", 1), ("gradient_accumulation_steps", 1), ("lora_r", 1),
                      ("lora_alpha", 1)):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ValueError(f"max_steps must be -1 (from num_train_epochs) or >= 1, got {cfg.max_steps}")
    if cfg.max_steps == -1 and not cfg.num_train_epochs > 0:
        raise ValueError(f"num_train_epochs must be > 0, got {cfg.num_train_epochs}")
    for name in ("learning_rate", "head_learning_rate"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must lie in [0, 1), got {cfg.lora_dropout}")
    if not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):
        raise ValueError(f"max_grad_norm must be a finite number >= 0, got {cfg.max_grad_norm}")
    if cfg.center_rewards_coefficient is not None and not (math.isfinite(cfg.center_rewards_coefficient)
                                                           and cfg.center_rewards_coefficient >= 0):
        raise ValueError(f"center_rewards_coefficient must be a finite number >= 0, got {cfg.center_rewards_coefficient}")
    if not cfg.lora_target_modules.strip():
        raise ValueError("lora_target_modules must be 'all-linear' or a comma-separated list of module names")
    if cfg.finetune == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("--finetune lora needs peft: pip install 'prefcore[lora]' (or use --finetune full)") from None


def _saved_config(cfg: TrainRMConfig) -> dict:
    """The settings that define a run, with the SHA-256 of its data files (a resumed run must
    match them all)."""
    from prefcore.train.rm.sources import data_fingerprint

    d = asdict(cfg)
    for volatile in ("resume", "progress", "device"):
        d.pop(volatile)
    d["data_sha256"] = data_fingerprint(cfg)
    return d


def check_resume_config(cfg: TrainRMConfig, config_path: str) -> None:
    """A resumed run must have the checkpointed run's settings and data (``config.json``)."""
    with open(config_path) as f:
        saved = json.load(f)
    now = _saved_config(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise ValueError(f"resume: the configuration differs from the checkpointed run in {diff}")


def save_heads(heads: nn.Module, head_cfg: dict, out_dir: str) -> None:
    """``heads.safetensors`` (weights) and ``heads.json`` (what rebuilds them), each atomically."""
    atomic_save_safetensors(os.path.join(out_dir, "heads.safetensors"), heads.state_dict())
    atomic_write_json(os.path.join(out_dir, "heads.json"), head_cfg)


def load_heads(out_dir: str) -> tuple[nn.ModuleDict, dict]:
    """Rebuild the heads saved by a run: ``(heads, head_config)``."""
    from safetensors.torch import load_file

    from prefcore.train.rm.methods import build_heads

    with open(os.path.join(out_dir, "heads.json")) as f:
        head_cfg = json.load(f)
    heads = build_heads(head_cfg)
    heads.load_state_dict(load_file(os.path.join(out_dir, "heads.safetensors")))
    return heads.eval(), head_cfg


def training_rewards(heads: nn.ModuleDict, head_cfg: dict, train) -> torch.Tensor:
    """The trained model's mean reward ``(N,)`` float32 on its training texts: pairs' chosen and
    rejected responses (bt, bt-margin; qrm, whose gate needs the pairs' prompt features), or the
    rated responses (gmm, mean-var)."""
    from prefcore.train.rm.scoring import RunScorer, risk_reward

    scorer = RunScorer(heads, head_cfg)
    if head_cfg["method"] in ("gmm", "mean-var"):
        parts = [(train.ratings.features, None)]
    else:
        parts = [(train.pairs.chosen, train.pairs.prompt), (train.pairs.rejected, train.pairs.prompt)]
    return torch.cat([risk_reward(scorer.distribution_from_features(f, p), "mean").reshape(-1).float()
                      for f, p in parts])


def finish_run_dir(cfg: TrainRMConfig, heads: nn.ModuleDict, head_cfg: dict, train) -> None:
    """Make the run directory self-contained (:mod:`prefcore.train.rm.rmdir`): a text run stores
    its frozen backbone and tokenizer in ``RUN/backbone`` (loaded again from ``--backbone``, as the
    features were embedded), so scoring no longer needs the original path; every run stores its
    training rewards' mean/std in ``RUN/reward_stats.json``."""
    from prefcore.train.rm.rmdir import save_backbone_dir, write_reward_stats

    if cfg.backbone is not None:
        from prefcore.train.rm.sources import load_text_encoder

        backbone, tokenizer = load_text_encoder(cfg.backbone)
        save_backbone_dir(backbone, tokenizer, cfg.out)
    write_reward_stats(cfg.out, training_rewards(heads, head_cfg, train))


def format_report(report: dict) -> str:
    width = max(len(k) for k in report) if report else 0
    rows = [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in report.items()]
    return "\n".join(rows)


def train_reward_model(cfg: TrainRMConfig, data=None) -> dict:
    """Train ``cfg.method`` on ``data`` (an :class:`~prefcore.train.rm.data.RMData`; default: loaded
    from ``cfg.data``) into ``cfg.out``; returns the evaluation report (also written to
    ``OUT/report.json`` and printed).

    ``OUT`` receives ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (atomic, every
    ``checkpoint_every`` steps and per stage), ``heads.safetensors`` + ``heads.json`` and
    ``report.json``. With ``cfg.resume`` the run continues from the checkpoint and ends exactly as
    the uninterrupted run would (same weights, same metrics log, same report).

    The data are loaded and checked (schema, enough rows for the split) before anything is
    written, and before the backbone embeds a single text; ``progress=False`` also silences the
    bars and load reports of ``datasets`` and ``transformers`` (:mod:`prefcore._progress`), as
    they are on every torchrun rank but 0."""
    from prefcore._progress import library_output

    with library_output(cfg.progress and int(os.environ.get("RANK", "0")) == 0):
        if cfg.finetune != "none":
            from prefcore.train.rm.finetune import finetune_reward_model

            return finetune_reward_model(cfg)
        return _train_reward_model(cfg, data)


def _train_reward_model(cfg: TrainRMConfig, data) -> dict:
    """The frozen-feature path. Under torchrun the processes split the feature extraction (the
    shards of one cache, :func:`prefcore.train.rm.features.extract_features`); rank 0 then trains
    the heads on the whole cache and writes the run directory, the other ranks return ``{}``."""
    import torch.distributed as dist

    from prefcore.train.distributed import maybe_init, world

    own_group = maybe_init(cfg.device)
    try:
        if data is None:
            from prefcore.train.rm.sources import load_rm_data

            data = load_rm_data(cfg)  # validates everything before the (cached) feature extraction
        if world()[0] != 0:
            return {}
        return _train_heads(cfg, data)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train_heads(cfg: TrainRMConfig, data) -> dict:
    from prefcore.train.rm.methods import build_heads, evaluate, head_config, stages

    out = cfg.out
    train, test = data.split(cfg.eval_fraction, cfg.seed)
    os.makedirs(out, exist_ok=True)
    hc = head_config(cfg.method, data, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = build_heads(hc)

    config_path = os.path.join(out, "config.json")
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"resume: no checkpoint.pt in {out!r} (start without --resume)")
        check_resume_config(cfg, config_path)
        heads.load_state_dict(ckpt["module"])
    else:
        for stale in ("checkpoint.pt", METRICS, "report.json"):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
        atomic_write_json(config_path, _saved_config(cfg))

    done: list[str] = list(ckpt["done_stages"]) if ckpt else []
    if ckpt is not None:
        at_stage, at_step = ckpt["stage"], int(ckpt["step"])
        MetricsLog(os.path.join(out, METRICS)).truncate_after(
            lambda rec: rec["stage"] in done or (rec["stage"] == at_stage and rec["step"] <= at_step))
    for i, stage in enumerate(stages(cfg.method, heads, train, cfg)):
        if stage.name in done:
            continue
        resume_state = ckpt if (ckpt and ckpt["stage"] == stage.name and not ckpt["finished"]) else None
        run_stage(stage.name, i, heads, stage.params, stage.batch_loss, stage.n_items,
                  cfg.loop_config(stage.steps), out, done_stages=list(done), resume_state=resume_state,
                  progress=cfg.progress)
        done.append(stage.name)
    save_heads(heads, hc, out)
    finish_run_dir(cfg, heads, hc, train)
    report = {"method": cfg.method, **evaluate(cfg.method, heads, test, cfg)}
    atomic_write_json(os.path.join(out, "report.json"), report)
    print(f"prefcore train-rm [{cfg.method}] → {out}\n{format_report(report)}")
    return report
