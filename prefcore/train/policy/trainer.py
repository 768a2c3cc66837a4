"""RLOO, GRPO and PPO on a causal LM against a (distributional) reward: :class:`PolicyTrainer`
and :func:`train_policy`.

One step (every rank; ``P = per_device_train_batch_size × gradient_accumulation_steps`` prompts
per rank, ``k = num_generations`` completions each, prompt-major):

1. the step's global prompts are positions ``step·G … step·G + G − 1`` (``G = P × world``) of an
   endless stream of per-epoch permutations (seeded by ``(seed, epoch)``); rank ``r`` takes slice
   ``r·P … r·P + P − 1``; all are left-padded to the longest prompt of the *global* batch;
2. sampling with a KV cache (:mod:`.sampling`; noise keyed per completion);
3. the completion texts are scored (:mod:`.rewards`) → utility; ``missing_eos_penalty`` is
   subtracted on truncated completions, then ``reward_clip`` clamps;
4. log-probs of the old policy and the reference on exactly the generated tokens (and PPO values);
5. ``prefcore.ops.kl_penalized_advantages`` (rloo / grpo / gae), optional whitening across ranks;
6. ``num_ppo_epochs`` optimiser steps, each accumulating the ``gradient_accumulation_steps``
   micro-batches (clipped surrogate, + GRPO k3 term, + PPO clipped value loss), grad-norm clip;
7. metrics (global) to ``metrics.jsonl``; β update; checkpoint every ``save_steps``.

Output directory: ``config.json`` (the settings), ``metrics.jsonl``, ``checkpoint.pt`` (atomic),
``policy/`` (``save_pretrained`` of the final policy and tokenizer) and, for PPO,
``value_head.safetensors``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from prefcore import ops
from prefcore._io import (
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_json,
    sha256_state_dict,
    sha256_strings,
)
from prefcore.train.distributed import all_reduce_sum, maybe_init, shard_decoder_layers
from prefcore.train.distributed import world as dist_world
from prefcore.train.loop import CHECKPOINT, METRICS, MetricsLog
from prefcore.train.policy.config import PolicyConfig, load_utility
from prefcore.train.policy.embedded import default_world_setup
from prefcore.train.policy.logprobs import PolicyWithValue, trunk_and_head, unwrap
from prefcore.train.policy.losses import (
    AdaptiveKL,
    agg_denominator,
    agg_numerator,
    clipped_policy_loss,
    clipped_value_loss,
    k3_kl,
)
from prefcore.train.policy.prompts import load_prompts
from prefcore.train.policy.rewards import low_quantiles, make_reward, reward_kind
from prefcore.train.policy.sampling import completion_noise, stream_seed

QUANTILE_LEVELS = (0.05, 0.1, 0.25)
TIMING_KEYS = ("step_time", "tokens_per_s", "time/generate", "time/score", "time/update")


# ---- device --------------------------------------------------------------------------------

def _resolve_device(cfg: PolicyConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {cfg.device!r} requested but CUDA is not available")
    if cfg.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(cfg.device)


# ---- loading -------------------------------------------------------------------------------

def check_causal_lm_path(path: str) -> None:
    """Fail fast, before loading weights: ``path`` must be a local transformers causal-LM dir."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model_name_or_path: no such directory {path!r} (a local AutoModelForCausalLM)")
    try:
        mcfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model_name_or_path: {path!r} holds no readable transformers config ({exc})") from None
    if type(mcfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"model_name_or_path: {path!r} is a {type(mcfg).__name__}, which has no causal-LM "
                         "(AutoModelForCausalLM) class")
    archs = getattr(mcfg, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(f"model_name_or_path: {path!r} holds a {archs[0]}, not a causal LM")


def check_tokenizer(tok) -> None:
    if tok is None or getattr(tok, "eos_token_id", None) is None or getattr(tok, "pad_token_id", None) is None:
        have = None if tok is None else (tok.pad_token_id if hasattr(tok, "pad_token_id") else None,
                                         tok.eos_token_id if hasattr(tok, "eos_token_id") else None)
        raise ValueError(f"tokenizer: needs a pad token and an eos token (pad_token_id, eos_token_id) = {have}; "
                         "set tokenizer.pad_token / eos_token")


class PolicyTrainer:
    """Risk-aware RLOO / GRPO / PPO (see the module docstring).

    ``model``: an ``nn.Module`` causal LM, or None for ``cfg.model_name_or_path``. ``tokenizer``:
    needed with a module (with a path: the path's, or ``cfg.tokenizer_name_or_path``). ``prompts``:
    a ``datasets.Dataset`` with a ``prompt`` column, a JSONL/Parquet path or a ``list[str]``
    (default ``cfg.dataset``). ``reward``: a train-rm run dir, a sequence-classifier dir,
    ``"module:function"`` or a callable ``f(prompts, completions, **kw)`` (default
    ``cfg.reward_model``). ``ref_model``: the reference (default: a frozen copy of the initial
    policy; with LoRA, the policy with adapters disabled). The passed module is trained in place."""

    def __init__(self, cfg: PolicyConfig, *, model: nn.Module | str | None = None, tokenizer=None,
                 prompts: object = None, reward: object = None, ref_model: nn.Module | None = None):
        cfg.validate()
        self.cfg = cfg
        self.device = _resolve_device(cfg)
        self._owns_pg = maybe_init(str(self.device))
        self.rank, self.world = dist_world()
        if cfg.fsdp and self.world < 2:
            raise ValueError("fsdp: FSDP2 sharding needs a torchrun launch with >= 2 processes "
                             "(torchrun --nproc-per-node N prefcore train-policy --fsdp true …)")
        if cfg.fsdp and cfg.use_lora:
            raise ValueError("fsdp: sharding LoRA adapters is not supported; use DDP (drop --fsdp) with use_lora")

        model = model if model is not None else cfg.model_name_or_path
        prompts = prompts if prompts is not None else cfg.dataset
        reward = reward if reward is not None else cfg.reward_model
        if model is None or prompts is None or reward is None:
            world = default_world_setup(seed=cfg.seed, model=model is None, prompts=prompts is None,
                                        reward=reward is None, progress=not cfg.no_progress)
            model = model if model is not None else world.get("model")
            tokenizer = tokenizer if tokenizer is not None else world.get("tokenizer")
            prompts = prompts if prompts is not None else world.get("prompts")
            reward = reward if reward is not None else world.get("reward")
        # every check that needs no weights first
        self.utility = load_utility(cfg.utility)
        if isinstance(reward, (str, os.PathLike)):
            reward_kind(os.fspath(reward))
        elif not callable(reward):
            raise ValueError(f"reward: expected a path, 'module:function' or a callable, got {type(reward).__name__}")
        self.prompts = load_prompts(prompts)
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            check_causal_lm_path(path)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or path, local_files_only=True)
            check_tokenizer(tokenizer)
            self.reward = make_reward(reward, self.utility, cfg.utility, device=str(self.device))
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        elif isinstance(model, nn.Module):
            if tokenizer is None and cfg.tokenizer_name_or_path:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path, local_files_only=True)
            check_tokenizer(tokenizer)
            self.reward = make_reward(reward, self.utility, cfg.utility, device=str(self.device))
        else:
            raise ValueError(f"model: expected a local path or an nn.Module, got {type(model).__name__}")
        trunk_and_head(model)  # a causal LM with a bias-free head
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
        self.prompt_tokens = self._tokenize_prompts()
        needed = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world
        if len(self.prompts) < needed:
            raise ValueError(f"prompts: {len(self.prompts)} prompts, but one step needs {needed} "
                             "(per_device_train_batch_size × gradient_accumulation_steps × ranks)")

        model = model.to(self.device)
        self.initial_sha = sha256_state_dict(model.state_dict())
        self.lora = cfg.use_lora
        if cfg.use_lora:
            model = self._add_lora(model)
        if ref_model is None and not cfg.use_lora:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model = ref_model.to(self.device).eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)
        self.ref_model = ref_model
        if cfg.gradient_checkpointing:
            m = unwrap(model)
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(m, "gradient_checkpointing_enable"):
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise ValueError("gradient_checkpointing: the model supports no activation checkpointing")
        self.model = model
        value_head = None
        if cfg.algo == "ppo":
            hidden = trunk_and_head(model)[1].weight.shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stream_seed(cfg.seed, 7))
                value_head = nn.Linear(hidden, 1).to(self.device)
            nn.init.zeros_(value_head.bias)
        self.module = PolicyWithValue(model, value_head)
        self.ref_module = PolicyWithValue(ref_model) if ref_model is not None else None
        self.ddp = None
        self.fsdp = cfg.fsdp
        if self.fsdp:
            self._shard()
        elif self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.step = 0
        self.out = cfg.run_dir
        self.log = MetricsLog(os.path.join(self.out, METRICS))
        self._setup_run_dir()

    # ---- setup ---------------------------------------------------------------------------

    def _add_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = self.cfg.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        lcfg = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)

    def _tokenize_prompts(self) -> list[list[int]]:
        out = []
        for i, p in enumerate(self.prompts):
            ids = list(self.tokenizer(p)["input_ids"])[-self.cfg.max_prompt_length:]
            if not ids:
                raise ValueError(f"prompts: prompt {i} ({p!r}) has no tokens")
            out.append(ids)
        return out

    def _setup_run_dir(self) -> None:
        cfg, out = self.cfg, self.out
        config_path = os.path.join(out, "config.json")
        now = {**cfg.saved(), "prompts_sha256": sha256_strings(self.prompts),
               "global_prompts_per_step": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world}
        if cfg.resume:
            ckpt_path = os.path.join(out, CHECKPOINT)
            if not os.path.exists(ckpt_path):
                raise FileNotFoundError(f"resume: no checkpoint.pt in {out!r} (start without --resume)")
            with open(config_path) as f:
                saved = json.load(f)
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if diff:
                raise ValueError(f"resume: the configuration differs from the checkpointed run in {diff}")
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if ckpt["initial_sha256"] != self.initial_sha:
                raise ValueError("resume: the initial policy differs from the checkpointed run's (model weights)")
            self._load_state(ckpt)
            if self.rank == 0:
                self.log.truncate_after(lambda rec: rec["step"] <= self.step)
        elif self.rank == 0:
            os.makedirs(out, exist_ok=True)
            for stale in (CHECKPOINT, METRICS):
                if os.path.exists(os.path.join(out, stale)):
                    os.remove(os.path.join(out, stale))
            atomic_write_json(config_path, now)
        if self.world > 1:
            dist.barrier()

    def _shard(self) -> None:
        """FSDP2: ``fully_shard`` every decoder layer and then the root (policy + value head; the
        embeddings, final norm and LM head live in the root's group), same for the reference. Sampling
        runs inside the root's forward (``PolicyWithValue(..., sample=…)``), so the hooks gather what it reads."""
        for module in (self.module, self.ref_module):
            if module is not None:
                shard_decoder_layers(module, trunk_and_head(module.model)[0])

    def _module_state(self) -> tuple[dict, dict]:
        if not self.fsdp:
            return self.module.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.module, options=opts),
                get_optimizer_state_dict(self.module, self.optimizer, options=opts))

    def _state(self) -> dict:
        module_sd, optim_sd = self._module_state()
        return {"step": self.step, "module": module_sd, "optimizer": optim_sd,
                "kl_controller": self.kl.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "initial_sha256": self.initial_sha, "config": self.cfg.saved()}

    def _load_state(self, ckpt: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.module, ckpt["module"], options=opts)
            set_optimizer_state_dict(self.module, self.optimizer, ckpt["optimizer"], options=opts)
        else:
            self.module.load_state_dict(ckpt["module"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.kl.load_state_dict(ckpt["kl_controller"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.step = int(ckpt["step"])

    def save_checkpoint(self) -> None:
        state = self._state()  # collective under FSDP
        if self.rank == 0:
            atomic_torch_save(os.path.join(self.out, CHECKPOINT), state)
        if self.world > 1:
            dist.barrier()

    # ---- one step ------------------------------------------------------------------------

    def step_prompts(self, step: int) -> list[int]:
        """Global prompt indices of ``step`` (all ranks), from the endless per-epoch permutation stream."""
        n = len(self.prompts)
        g = self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps * self.world
        out, cache = [], {}
        for pos in range(step * g, (step + 1) * g):
            epoch, i = divmod(pos, n)
            if epoch not in cache:
                cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.cfg.seed, 1, epoch)))
            out.append(int(cache[epoch][i]))
        return out

    def _autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_slices(self, rows: int) -> list[slice]:
        per = self.cfg.per_device_train_batch_size * self.cfg.num_generations
        return [slice(s, min(rows, s + per)) for s in range(0, rows, per)]

    @torch.no_grad()
    def _logprobs(self, module: PolicyWithValue, batch: dict, want_entropy: bool):
        lps, ents, vals = [], [], []
        for sl in self._micro_slices(batch["prompt_ids"].shape[0]):
            with self._autocast():
                lp, ent, v = module(batch["prompt_ids"][sl], batch["prompt_mask"][sl], batch["ids"][sl],
                                    batch["mask"][sl], self.cfg.temperature, want_entropy)
            lps.append(lp.float())
            ents.append(ent.float() if ent is not None else None)
            vals.append(v.float() if v is not None else None)
        cat = (lambda xs: torch.cat(xs) if xs[0] is not None else None)
        return cat(lps), cat(ents), cat(vals)

    def _rollout(self, step: int) -> dict:
        cfg, k = self.cfg, self.cfg.num_generations
        gidx = self.step_prompts(step)
        p_local = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        local = gidx[self.rank * p_local:(self.rank + 1) * p_local]
        lp = max(len(self.prompt_tokens[i]) for i in gidx)  # pad to the *global* longest prompt
        rows = [i for i in local for _ in range(k)]
        pids = torch.full((len(rows), lp), self.pad_id, dtype=torch.long)
        pmask = torch.zeros(len(rows), lp, dtype=torch.bool)
        for r, i in enumerate(rows):
            t = self.prompt_tokens[i]
            pids[r, lp - len(t):] = torch.tensor(t)
            pmask[r, lp - len(t):] = True
        first = self.rank * p_local * k
        noise = completion_noise(cfg.seed, step, list(range(first, first + len(rows))), cfg.max_completion_length)
        pids, pmask = pids.to(self.device), pmask.to(self.device)
        gen = unwrap(self.model)
        was_training = gen.training
        gen.eval()
        chunks = []
        for sl in self._micro_slices(len(rows)):
            with self._autocast(), torch.no_grad():
                chunks.append(self.module(pids[sl], pmask[sl], temperature=cfg.temperature, sample=dict(
                    noise=noise[sl], eos_id=self.eos_id, pad_id=self.pad_id, top_k=cfg.top_k, top_p=cfg.top_p)))
        gen.train(was_training)
        tc = max(c.ids.shape[1] for c in chunks)
        ids = torch.cat([nn.functional.pad(c.ids, (0, tc - c.ids.shape[1]), value=self.pad_id) for c in chunks])
        mask = torch.cat([nn.functional.pad(c.mask, (0, tc - c.mask.shape[1]), value=False) for c in chunks])
        truncated = torch.cat([c.truncated for c in chunks])
        return {"rows": rows, "prompt_ids": pids, "prompt_mask": pmask, "ids": ids, "mask": mask,
                "truncated": truncated}

    def _texts(self, batch: dict) -> tuple[list[str], list[str]]:
        prompts = [self.prompts[i] for i in batch["rows"]]
        completions = []
        for ids, m in zip(batch["ids"].cpu(), batch["mask"].cpu()):
            toks = [int(t) for t in ids[m] if int(t) != self.eos_id]
            completions.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        return prompts, completions

    def _whiten(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(A − μ)/sqrt(σ² + 1e-8)`` over valid tokens of all ranks (count, sum, sum of squares
        all-reduced in float64; unbiased σ²)."""
        m = mask.to(torch.float64)
        a = adv.to(torch.float64)
        stats = all_reduce_sum(torch.stack([m.sum(), (a * m).sum(), (a * a * m).sum()]), self.world)
        n, s, ss = stats.tolist()
        if n < 2:
            raise ValueError(f"whiten_advantages: needs at least 2 valid tokens in the step, got {int(n)}")
        mu = s / n
        var = max(0.0, (ss - n * mu * mu) / (n - 1))
        return (((a - mu) / math.sqrt(var + 1e-8)) * m).to(adv.dtype)

    def compute_advantages(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                           utility: torch.Tensor, beta: float, values: torch.Tensor | None = None):
        """:func:`prefcore.ops.kl_penalized_advantages` in the algorithm's mode (rloo | grpo | gae for
        ppo) with β in the reward (not for grpo with ``kl_in_reward=False``), then — with
        ``whiten_advantages`` — whitened over the valid tokens of every rank. Returns the op's
        named tuple with ``advantages`` replaced by the whitened ones."""
        cfg = self.cfg
        in_reward = cfg.algo != "grpo" or cfg.kl_in_reward
        mode = {"rloo": "rloo", "grpo": "grpo", "ppo": "gae"}[cfg.algo]
        adv = ops.kl_penalized_advantages(
            logprobs, ref_logprobs, mask, utility, kl_coef=beta if in_reward else 0.0,
            estimator=cfg.kl_estimator, mode=mode, group_size=None if mode == "gae" else cfg.num_generations,
            values=values if mode == "gae" else None, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = adv._replace(advantages=self._whiten(adv.advantages, mask))
        return adv

    def train_step(self) -> dict:
        """One rollout + update; returns the step's (global) metrics."""
        cfg, k, step = self.cfg, self.cfg.num_generations, self.step
        t0 = time.perf_counter()
        batch = self._rollout(step)
        t1 = time.perf_counter()
        prompts, completions = self._texts(batch)
        failure = None
        try:
            scored = self.reward(prompts, completions, completion_ids=[ids[m].tolist() for ids, m in
                                                                       zip(batch["ids"].cpu(), batch["mask"].cpu())])
        except ValueError as exc:
            failure = exc
        if self.world > 1:  # every rank stops together (no rank left waiting in a collective)
            failed = all_reduce_sum(torch.tensor([0.0 if failure is None else 1.0]), self.world)
            if failed.item() > 0 and failure is None:
                raise ValueError("reward: the reward failed on another rank (its error names the prompt)")
        if failure is not None:
            raise failure
        utility = scored.utility.clone()
        truncated = batch["truncated"].cpu()
        if cfg.missing_eos_penalty is not None:
            utility = utility - cfg.missing_eos_penalty * truncated.float()
        if cfg.reward_clip is not None:
            utility = utility.clamp(-cfg.reward_clip, cfg.reward_clip)
        t2 = time.perf_counter()

        mask = batch["mask"]
        old_lp, entropy, old_values = self._logprobs(self.module, batch, want_entropy=True)
        if self.ref_module is not None:
            ref_lp, _, _ = self._logprobs(self.ref_module, batch, want_entropy=False)
        else:  # LoRA: the reference is the base model, adapters off
            with unwrap_peft(self.model).disable_adapter():
                ref_lp, _, _ = self._logprobs(PolicyWithValue(self.model), batch, want_entropy=False)
        beta = self.kl.beta
        in_reward = cfg.algo != "grpo" or cfg.kl_in_reward
        adv = self.compute_advantages(old_lp, ref_lp, mask, utility.to(self.device), beta, old_values)
        advantages = adv.advantages
        self.last_rollout = {**batch, "utility": utility, "old_logprobs": old_lp, "ref_logprobs": ref_lp,
                             "advantages": advantages, "kl": adv.kl, "returns": adv.returns, "values": old_values,
                             "prompts": prompts, "completions": completions}

        # step-wide normaliser (all micro-batches, all ranks)
        counts = all_reduce_sum(torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64), self.world)
        denom = agg_denominator(cfg.loss_agg_mode, counts[0].item(), counts[1].item(), cfg.max_completion_length)
        scale = self.world / denom  # DDP averages gradients over ranks
        runner = self.ddp if self.ddp is not None else self.module
        self.module.train()
        sums = {"loss": 0.0, "clip_num": 0.0, "value_loss": 0.0, "grad_norm": 0.0}
        slices = self._micro_slices(mask.shape[0])
        for _ in range(cfg.num_ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for j, sl in enumerate(slices):
                sync = self.ddp is None or j == len(slices) - 1
                ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
                with ctx:
                    with self._autocast():
                        lp, _, values = runner(batch["prompt_ids"][sl], batch["prompt_mask"][sl], batch["ids"][sl],
                                               mask[sl], cfg.temperature, False)
                    m = mask[sl]
                    per_tok, clipped = clipped_policy_loss(lp.float(), old_lp[sl], advantages[sl], eps_low=cfg.epsilon,
                                                           eps_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c)
                    if not in_reward:
                        per_tok = per_tok + beta * k3_kl(lp.float(), ref_lp[sl])
                    num = agg_numerator(per_tok, m, cfg.loss_agg_mode)
                    if values is not None:
                        vl = clipped_value_loss(values, old_values[sl], adv.returns[sl], cfg.cliprange_value)
                        vnum = agg_numerator(vl, m, cfg.loss_agg_mode)
                        num = num + cfg.vf_coef * vnum
                        sums["value_loss"] += float(vnum.detach()) / denom
                    loss = num * scale
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"policy loss is not finite ({float(loss)}) at step {step}")
                    loss.backward()
                sums["loss"] += float(num.detach()) / denom
                sums["clip_num"] += float((clipped & m).sum())
            if cfg.max_grad_norm is not None:
                gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            else:
                gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
            if hasattr(gn, "full_tensor"):  # a DTensor under FSDP2
                gn = gn.full_tensor()
            sums["grad_norm"] += float(gn)
            self.optimizer.step()
        self.module.eval()
        t3 = time.perf_counter()

        # ---- global metrics -----------------------------------------------------------------
        mf = mask.float().cpu()
        lengths = mf.sum(-1)
        seq_kl = adv.kl.float().cpu().sum(-1)
        ent = (entropy.cpu() * mf).sum()
        r = scored.reward.double()
        u = scored.utility.double()
        local = [len(r), r.sum(), (r * r).sum(), u.sum(), seq_kl.double().sum(), ent.double(), mf.sum().double(),
                 lengths.double().sum(), truncated.double().sum(), sums["clip_num"], sums["loss"],
                 sums["value_loss"], float(mask.shape[1])]
        names = ["n", "r", "rr", "u", "kl", "ent", "tok", "len", "trunc", "clip", "loss", "vloss", "tmax"]
        qs = {}
        if scored.dist is not None:
            qs = low_quantiles(scored.dist, QUANTILE_LEVELS)
            for t in QUANTILE_LEVELS:
                local.append(qs[t].sum())
                names.append(f"q{t}")
        tot = dict(zip(names, all_reduce_sum(torch.tensor([float(x) for x in local], dtype=torch.float64),
                                         self.world).tolist()))
        n, ntok = tot["n"], max(1.0, tot["tok"])
        var = (tot["rr"] - tot["r"] ** 2 / n) / (n - 1) if n > 1 else 0.0
        self.step += 1
        rec = {
            "step": self.step, "reward": tot["r"] / n, "reward_std": math.sqrt(max(0.0, var)),
            "utility": tot["u"] / n, "kl": tot["kl"] / n, "kl_coef": beta, "entropy": tot["ent"] / ntok,
            "completions/mean_length": tot["len"] / n, "completions/clipped_ratio": tot["trunc"] / n,
            "clip_ratio": tot["clip"] / (ntok * cfg.num_ppo_epochs),
            "loss": tot["loss"] / cfg.num_ppo_epochs, "grad_norm": sums["grad_norm"] / cfg.num_ppo_epochs,
            "learning_rate": cfg.learning_rate,
            "step_time": t3 - t0, "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
            "tokens_per_s": tot["tok"] / max(1e-9, t3 - t0),
        }
        if cfg.algo == "ppo":
            rec["value_loss"] = tot["vloss"] / cfg.num_ppo_epochs
        for t in qs:
            rec[f"reward_quantile/{t:g}"] = tot[f"q{t}"] / n
        self.kl.update(rec["kl"], int(n))
        return rec

    # ---- the loop ------------------------------------------------------------------------

    def train(self, until: int | None = None) -> dict:
        """Train to ``cfg.max_steps`` (or stop after step ``until``, leaving a checkpoint: used to
        test resumption); the final policy is saved when ``max_steps`` is reached."""
        cfg = self.cfg
        stop = cfg.max_steps if until is None else min(until, cfg.max_steps)
        bar = None
        if self.rank == 0 and not cfg.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train-policy [{cfg.algo}]", dynamic_ncols=True)
        rec: dict = {}
        try:
            while self.step < stop:
                rec = self.train_step()
                if self.rank == 0 and (self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps):
                    self.log.write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl']:.3f}")
                if self.step % cfg.save_steps == 0 or self.step == stop:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if self.step >= cfg.max_steps:
            self.save_final()
        return {"step": self.step, "metrics": rec, "output_dir": self.out,
                "policy_dir": os.path.join(self.out, "policy")}

    def save_final(self) -> None:
        full = self._module_state()[0] if self.fsdp else None  # collective under FSDP
        if self.rank == 0:
            pdir = os.path.join(self.out, "policy")
            m = self.model.merge_and_unload() if self.lora and hasattr(self.model, "merge_and_unload") else unwrap(self.model)
            if full is None:
                m.save_pretrained(pdir)
                head_sd = self.module.value_head.state_dict() if self.module.value_head is not None else None
            else:
                m.save_pretrained(pdir, state_dict={k[len("model."):]: v for k, v in full.items() if k.startswith("model.")})
                head_sd = {k[len("value_head."):]: v for k, v in full.items() if k.startswith("value_head.")} or None
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(pdir)
            if head_sd is not None:
                atomic_save_safetensors(os.path.join(self.out, "value_head.safetensors"), head_sd)
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self._owns_pg and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_pg = False


def unwrap_peft(model: nn.Module) -> nn.Module:
    if not hasattr(model, "disable_adapter"):
        raise ValueError("use_lora: the policy is not a peft model")
    return model


def train_policy(cfg: PolicyConfig, *, model: nn.Module | str | None = None, tokenizer=None, prompts: object = None,
                 reward: object = None, ref_model: nn.Module | None = None) -> dict:
    """Run :class:`PolicyTrainer` to ``cfg.max_steps``; returns ``{"step", "metrics" (the last
    step's record), "output_dir", "policy_dir"}``. ``no_progress`` also silences the bars and load
    reports of ``datasets``/``transformers`` (:mod:`prefcore._progress`)."""
    from prefcore._progress import library_output

    with library_output(not cfg.no_progress):
        trainer = PolicyTrainer(cfg, model=model, tokenizer=tokenizer, prompts=prompts, reward=reward,
                                ref_model=ref_model)
        try:
            return trainer.train()
        finally:
            trainer.close()
