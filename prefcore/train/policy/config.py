"""Configuration of policy optimisation (``prefcore train-policy``): :class:`PolicyConfig`.

Names follow TRL where TRL has one. Every setting is checked by :meth:`PolicyConfig.validate`
(run from ``__post_init__``) with a one-line ``ValueError`` naming it, before any model is loaded.

Loss aggregation (``loss_agg_mode``), for per-token losses ``ℓ_it`` and the completion mask
``m_it`` over the *whole* batch of one optimisation step (every accumulation micro-batch and
every rank; ``N`` completions, ``L = max_completion_length``):

=========================  ====================================================================
``token-mean``              ``Σ_it m_it ℓ_it / Σ_it m_it``
``seq-mean-token-sum``      ``(1/N) Σ_i Σ_t m_it ℓ_it``
``seq-mean-token-mean``     ``(1/N) Σ_i (Σ_t m_it ℓ_it / max(1, Σ_t m_it))``
``seq-sum-norm``            ``Σ_it m_it ℓ_it / (N·L)``  (Dr. GRPO: a constant normaliser)
=========================  ====================================================================
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

ALGOS = ("rloo", "grpo", "ppo")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-sum-norm")
# Settings that do not change what a run computes: a resumed run may differ in these.
VOLATILE = ("resume", "no_progress", "max_steps", "save_steps", "logging_steps", "output_dir", "out", "device")


def load_utility(spec: str):
    """``spec`` → ``utility(dist) -> (B,)``: the one place the trainer parses utilities."""
    from prefcore.utility import parse_utility

    return parse_utility(spec)


@dataclass
class PolicyConfig:
    """Settings of one policy-optimisation run (flags, or a JSON/YAML file with these keys)."""

    algo: str = field(default="rloo", metadata={"help": "rloo | grpo | ppo", "choices": ALGOS})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "local path of a transformers AutoModelForCausalLM (the initial policy)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "tokenizer path (default: the model's)"})
    reward_model: str | None = field(default=None, metadata={
        "help": "a prefcore train-rm run directory, a local AutoModelForSequenceClassification path, "
                "'module:function' (a TRL-style reward function), or http://HOST:PORT[,…] (prefcore serve-rm servers)"})
    dataset: str | None = field(default=None, metadata={"help": "JSONL/Parquet file with a 'prompt' column"})
    utility: str = field(default="mean", metadata={
        "help": "risk functional of the reward distribution: mean | ce:λ | mean-var:α | cvar:α | quantile:τ"})
    output_dir: str | None = field(default=None, metadata={"help": "run directory (default runs/policy-<algo>)"})
    out: str | None = field(default=None, metadata={"help": "alias of --output_dir"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})
    # sampling
    num_generations: int = field(default=4, metadata={"help": "completions per prompt (>= 2 for rloo/grpo)"})
    max_prompt_length: int = field(default=128, metadata={"help": "prompt tokens kept (the last ones)"})
    max_completion_length: int = field(default=32, metadata={"help": "new tokens per completion"})
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = field(default=0, metadata={"help": "0 = no top-k filter"})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "subtracted from the reward of completions cut at max_completion_length"})
    # optimisation
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    per_device_train_batch_size: int = field(default=4, metadata={"help": "prompts per micro-batch per rank"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per step: each rank samples per_device_train_batch_size × this many prompts"})
    num_ppo_epochs: int = field(default=1, metadata={"help": "optimisation passes over each rollout"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient-norm clip (None: off)"})
    max_steps: int = 100
    seed: int = 0
    # policy loss
    epsilon: float = field(default=0.2, metadata={"help": "lower ratio clip: ratio >= 1 − epsilon"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper ratio clip (default: epsilon)"})
    clip_ratio_c: float | None = field(default=None, metadata={"help": "dual clip for negative advantages (> 1)"})
    loss_agg_mode: str = field(default="token-mean", metadata={"help": " | ".join(LOSS_AGG_MODES),
                                                                "choices": LOSS_AGG_MODES})
    whiten_advantages: bool = field(default=False, metadata={"help": "whiten advantages over all valid tokens "
                                                                     "(across ranks)"})
    reward_clip: float | None = field(default=None, metadata={"help": "clamp utilities to [−c, c]"})
    # KL
    kl_coef: float = field(default=0.05, metadata={"help": "β (initial β when target_kl is set)"})
    kl_estimator: str = field(default="k1", metadata={"help": " | ".join(KL_ESTIMATORS), "choices": KL_ESTIMATORS})
    target_kl: float | None = field(default=None, metadata={"help": "adaptive β toward this sequence KL"})
    kl_horizon: int = field(default=10000, metadata={"help": "horizon of the adaptive KL controller"})
    kl_in_reward: bool = field(default=True, metadata={"help": "grpo: KL in the reward (True) or a k3 loss term"})
    # PPO
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    # run
    logging_steps: int = 1
    save_steps: int = 50
    no_progress: bool = field(default=False, metadata={"help": "no tqdm progress bar"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast of the forward passes (sampling, log-prob passes, value head) on CPU or "
                "GPU; master weights and optimizer state stay fp32"})
    gradient_checkpointing: bool = False
    fsdp: bool = field(default=False, metadata={"help": "shard policy and reference with FSDP2 (torchrun)"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma-separated module names"})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def run_dir(self) -> str:
        return self.output_dir or self.out or os.path.join("runs", f"policy-{self.algo}")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> None:
        """One-line ``ValueError`` naming the first bad setting."""
        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        def number(name: str, *, low: float | None = None, high: float | None = None, strict_low: bool = False,
                   optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if low is not None and (v <= low if strict_low else v < low):
                raise ValueError(f"{name} must be {'>' if strict_low else '>='} {low}, got {v}")
            if high is not None and v > high:
                raise ValueError(f"{name} must be <= {high}, got {v}")

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        choice("algo", ALGOS)
        choice("kl_estimator", KL_ESTIMATORS)
        choice("loss_agg_mode", LOSS_AGG_MODES)
        integer("num_generations", 1)
        if self.algo in ("rloo", "grpo") and self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 for algo={self.algo!r} (the baseline needs another "
                             f"sample of the same prompt), got {self.num_generations}")
        for name in ("max_prompt_length", "max_completion_length", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "num_ppo_epochs", "max_steps", "logging_steps", "save_steps",
                     "kl_horizon", "lora_r", "lora_alpha"):
            integer(name, 1)
        integer("top_k", 0)
        integer("seed", 0)
        number("temperature", low=0.0, strict_low=True)
        number("top_p", low=0.0, high=1.0, strict_low=True)
        number("learning_rate", low=0.0, strict_low=True)
        number("weight_decay", low=0.0)
        number("max_grad_norm", low=0.0, strict_low=True, optional=True)
        number("epsilon", low=0.0, high=1.0, strict_low=True)
        number("epsilon_high", low=0.0, strict_low=True, optional=True)
        number("clip_ratio_c", low=1.0, strict_low=True, optional=True)
        number("reward_clip", low=0.0, strict_low=True, optional=True)
        number("missing_eos_penalty", optional=True)
        number("kl_coef", low=0.0)
        number("target_kl", low=0.0, strict_low=True, optional=True)
        number("vf_coef", low=0.0)
        number("cliprange_value", low=0.0, strict_low=True)
        number("gamma", low=0.0, high=1.0)
        number("lam", low=0.0, high=1.0)
        number("lora_dropout", low=0.0, high=1.0)
        if self.target_kl is not None and self.kl_coef <= 0:
            raise ValueError(f"kl_coef must be > 0 when target_kl is set (the controller scales it), got {self.kl_coef}")
        if not self.kl_in_reward and self.algo != "grpo":
            raise ValueError(f"kl_in_reward=False (a k3 KL loss term) is a grpo option, got algo={self.algo!r}")
        if self.output_dir and self.out and self.output_dir != self.out:
            raise ValueError(f"output_dir and out name different directories: {self.output_dir!r} vs {self.out!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.use_lora:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ValueError("use_lora needs the 'peft' package (pip install peft)")
        load_utility(self.utility)  # raises ValueError naming `utility`

    def saved(self) -> dict:
        """The settings that define the run (a resumed run must match them)."""
        d = asdict(self)
        for k in VOLATILE:
            d.pop(k, None)
        return d
