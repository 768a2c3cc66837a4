"""Fine-tune a reward model's backbone together with its head: ``prefcore train-rm --finetune
lora|full``, for every method.

The backbone (``--backbone``, a local transformers model loaded as its base model, so a
``…ForCausalLM`` never runs its LM head) and the method's heads (built as the frozen path builds
them) are trained jointly. ``bt`` / ``bt-margin`` train from a text pairs file ``{prompt, chosen,
rejected, votes?, margin?}`` with the Bradley–Terry loss

    L = −log σ(r_c − r_r − m) + c · mean(r_c² + r_r²)/2,

``m`` the vote margin (``bt-margin``) or 0, ``c`` = ``center_rewards_coefficient`` (TRL's centering
term, off by default). ``gmm``, ``mean-var`` and ``qrm`` train from ratings (or one attribute;
qrm: attributes too) with the frozen path's own losses — the fused ``gmm_nll``, the Gaussian NLL,
the fused pinball loss — applied to features the backbone computes on demand
(:class:`LiveFeatures`), so both paths share one loss code; qrm's gating stage then runs as on the
frozen path, on the fine-tuned model's features of the ``--pairs`` file. AdamW with two parameter groups (``learning_rate`` for the backbone or its
LoRA adapters, ``head_learning_rate`` for the head), linear warm-up over ``warmup_ratio`` of the
steps then ``linear`` / ``cosine`` decay or ``constant``, ``gradient_accumulation_steps``
micro-batches of ``per_device_train_batch_size`` pairs per step (the loss is averaged over the
step's pairs), gradient clipping at ``max_grad_norm``.

**No wasted compute.** Each pair is tokenised as ``[prefix] + prompt + "\\n\\n"`` and the response
(``prefix`` = the tokenizer's own leading special tokens, e.g. BOS), exactly the tokens the run's
scorer reads for ``prompt + "\\n\\n" + response``; pairs whose pieces do not concatenate to the
whole-text tokenisation are counted in the log. An over-long pair keeps its responses' ends and
cuts the prompt from the left (:func:`prefcore.data.truncate_pair`; ``too_long=drop`` drops it),
the prefix is always kept (as the tokenizer's own left truncation does); the log counts both.
Batches are length-grouped (:class:`prefcore.data.LengthGroupedBatchSampler`), and the pair
forward encodes the prompt once (:func:`prefcore.models.packing.pair_features`, ``packing``
``auto``/``packed``/``plain``; the choice and its reason are logged). No pad token is needed:
padding is masked.

**The run directory** holds what scoring needs (written atomically): ``backbone/`` — the
fine-tuned backbone (LoRA merged into the base weights) and tokenizer, which
:class:`~prefcore.train.rm.scoring.RunScorer`, ``train-policy --reward_model`` and the TRL
adapter load, so the run can be moved and the original backbone deleted; ``adapter/`` (LoRA
only, for reference); ``heads.safetensors`` + ``heads.json``; ``config.json``; ``metrics.jsonl``;
``reward_stats.json`` (the training rewards' mean/std); ``report.json`` (held-out pairwise
accuracy, or the frozen path's report for the ratings methods), and during training
``finetune_checkpoint.pt`` (atomic; ``--resume`` continues exactly, see :func:`optimize`). 
**Under torchrun** (several processes) the backbone trains with DDP, or with FSDP2 (``--fsdp``:
``fully_shard`` per decoder layer, then the root); the heads stay replicated. Each optimizer step
covers ``per_device_train_batch_size × gradient_accumulation_steps × processes`` rows and equals
the one-process step over the same rows (:func:`optimize`); rank 0 logs, checkpoints, evaluates
and writes the run directory.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prefcore._io import atomic_write_json
from prefcore.train.loop import METRICS, MetricsLog

# Called after every optimizer step with the step index (1-based); the step benchmark uses it.
AFTER_STEP: Callable[[int], None] | None = None


@dataclass
class TokenizedPairs:
    """Token ids of each pair's pieces after truncation (``prompt`` includes the prefix)."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    margin: torch.Tensor | None  # (N,) float32, bt-margin


def _prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (e.g. BOS). A tokenizer that adds
    anything after the text (an EOS would be the pooled token, not the response's end) is refused."""
    empty = list(tokenizer("")["input_ids"])
    probe = list(tokenizer("x")["input_ids"])
    if probe != empty + list(tokenizer("x", add_special_tokens=False)["input_ids"]):
        raise ValueError("--finetune: the tokenizer adds special tokens after the text (or around it in another "
                         "layout); only tokenizers that add a prefix (e.g. BOS) or nothing are supported")
    return empty


def tokenize_pairs(tokenizer, records: Sequence, max_length: int, too_long: str, method: str) -> tuple[TokenizedPairs, list[int], dict]:
    """``(pairs, kept record indices, log counts)``: each record's pieces (module docstring)."""
    from prefcore.data.batching import TruncationStats, truncate_pair

    prefix = _prefix_ids(tokenizer)
    budget = max_length - len(prefix)
    if budget < 2:
        raise ValueError(f"max_length must leave room for the tokenizer's {len(prefix)} prefix token(s) and a "
                         f"response token, got {max_length}")
    stats = TruncationStats()
    out = TokenizedPairs([], [], [], None)
    kept: list[int] = []
    split_mismatch = 0
    margins = []
    enc = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for i, rec in enumerate(records):
        p = enc(f"{rec.prompt}\n\n")
        c, r = enc(rec.chosen), enc(rec.rejected)
        if not c or not r:
            raise ValueError(f"data row {i}: a response tokenizes to zero tokens (nothing to pool)")
        whole = enc(f"{rec.prompt}\n\n{rec.chosen}")
        split_mismatch += int(whole != p + c)
        cut = truncate_pair(p, c, r, budget, too_long=too_long, stats=stats)
        if cut is None:
            continue
        out.prompt.append(prefix + list(cut[0]))
        out.chosen.append(list(cut[1]))
        out.rejected.append(list(cut[2]))
        kept.append(i)
        if method == "bt-margin":
            m = rec.margin if rec.margin is not None else (rec.vote_margin() if rec.votes else None)
            if m is None:
                raise ValueError(f"data row {i}: method 'bt-margin' needs votes or a margin on every pair")
            margins.append(float(m))
    if not kept:
        raise ValueError(f"--too_long {too_long}: every pair is longer than max_length={max_length}; raise "
                         "--max_length or use --too_long truncate")
    if margins:
        out.margin = torch.tensor(margins, dtype=torch.float32)
    return out, kept, {"truncation": stats.message(max_length, too_long),
                       "split_tokenization_mismatch": split_mismatch}


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:  # step = optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1.0 - frac) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return f


def _apply_lora(backbone: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules.strip()
    target = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target)
    try:
        return get_peft_model(backbone, lcfg)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_target_modules={targets!r}: {exc}") from None


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def _pair_batch(pairs: TokenizedPairs, idx: Sequence[int], device: torch.device):
    from prefcore.data.batching import collate_pairs

    rows = [(pairs.prompt[i], pairs.chosen[i], pairs.rejected[i]) for i in idx]
    return [tuple(t.to(device) for t in seg) for seg in collate_pairs(rows, pad_id=0)]


class Encoder(nn.Module):
    """The module DDP and FSDP2 wrap: the backbone's pooled last-token features of a text batch
    (``forward("texts", ids, mask)`` → ``(B, H)``; ``forward("texts-packed", *PackedTexts fields)``
    → ``(N, H)``, :func:`prefcore.models.packing.packed_text_features`) or of a pair batch
    (``forward(packing, p, c, r)`` → ``(chosen (B, H), rejected (B, H))``,
    :func:`prefcore.models.packing.pair_features`). The
    backbone is called through this module's ``forward``, so the wrappers' hooks (gradient
    all-reduce, parameter all-gather) see every call."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, kind: str, *batch: object):
        from prefcore.models.packing import PackedTexts, packed_text_features, pair_features, transformers_base
        from prefcore.models.pooling import pooled_features

        if kind == "texts":
            ids, mask = batch
            return pooled_features(transformers_base(self.backbone), ids, mask, "last")
        if kind == "texts-packed":
            return packed_text_features(self.backbone, PackedTexts(*batch))
        f = pair_features(self.backbone, *batch, packing=kind)
        return f.chosen, f.rejected


def as_encoder(model: nn.Module) -> nn.Module:
    """``model`` when it already is an :class:`Encoder` (or a DDP wrapper of one), else a new
    :class:`Encoder` around the backbone ``model``."""
    return model if isinstance(_unwrap_ddp(model), Encoder) else Encoder(model)


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device  # a DTensor (FSDP2) reports its local device


def pair_rewards(encoder: nn.Module, heads: nn.ModuleDict, pairs: TokenizedPairs, idx: Sequence[int],
                 packing: str, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen, r_rejected)`` ``(B,)`` float32 of the pairs ``idx`` (with gradients);
    ``encoder``: a backbone, an :class:`Encoder` or its DDP/FSDP2 wrapper."""
    encoder = as_encoder(encoder)
    device = _device(encoder)
    p, c, r = _pair_batch(pairs, idx, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        chosen, rejected = encoder(packing, p, c, r)
    head = lambda x: heads["scalar"](heads["trunk"](x.float()))  # noqa: E731
    return head(chosen), head(rejected)


def finetune_reward_model(cfg) -> dict:
    """Fine-tune ``cfg.backbone`` with a ``cfg.method`` head on ``cfg.data`` into ``cfg.out``
    (module docstring); returns the held-out report (also ``OUT/report.json``; under torchrun
    rank 0 evaluates and writes, the other ranks return ``{}``)."""
    if not os.path.isfile(cfg.data):
        raise FileNotFoundError(f"data must be an existing JSONL/Parquet pairs file, got {cfg.data!r}")
    par = start_parallel(cfg)
    try:
        return _finetune(cfg, par)
    finally:
        par.close()


def _finetune(cfg, par: Parallel) -> dict:
    from prefcore.data.batching import pair_length
    from prefcore.models.packing import resolve_packing
    from prefcore.train.rm.sources import _load, data_kind, load_text_encoder

    kind = data_kind(cfg)
    ds = _load(cfg.data, cfg.data_format, kind, cfg)
    backbone, tokenizer = load_text_encoder(cfg.backbone, str(finetune_device(cfg)))
    if kind != "pairs":
        return _finetune_ratings(cfg, ds, kind, backbone, tokenizer, par)
    records = list(ds.records)
    pairs, kept, counts = tokenize_pairs(tokenizer, records, cfg.max_length, cfg.too_long, cfg.method)

    # split after tokenisation: held-out pairs are never trained on
    from prefcore.train.rm.data import held_out_count

    n = len(kept)
    n_test = held_out_count(n, cfg.eval_fraction, "pairs", source=cfg.data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    test_idx, train_idx = perm[:n_test], perm[n_test:]

    backbone, hc, heads = prepare_model(cfg, backbone)
    choice = resolve_packing(cfg.packing, backbone)
    encoder = Encoder(backbone)
    runner = wrap_encoder(par, encoder)

    step_pairs = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * par.world
    lengths = [pair_length(pairs.prompt[i], pairs.chosen[i], pairs.rejected[i], choice.mode) for i in train_idx]
    total = total_steps(cfg, len(train_idx), par.world)

    log, resume = start_run_dir(cfg, par)
    trunc = counts["truncation"]
    if par.rank == 0:
        print(f"prefcore train-rm [{cfg.method}, finetune {cfg.finetune}{par_note(par)}]: {len(records)} pairs, "
              f"{n - n_test} train / {n_test} held out; {choice.reason}; {trunc}; pairs whose split tokenization "
              f"differs from the whole text: {counts['split_tokenization_mismatch']}; {total} steps of {step_pairs} "
              "pairs", flush=True)

    margin = pairs.margin

    def micro_loss(part: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        r_c, r_r = pair_rewards(runner, heads, pairs, part, choice.mode, cfg.bf16)
        m = margin[part].to(r_c.device) if (cfg.method == "bt-margin" and margin is not None) else 0.0
        per_pair = -torch.nn.functional.logsigmoid(r_c - r_r - m)
        if cfg.center_rewards_coefficient:
            per_pair = per_pair + cfg.center_rewards_coefficient * 0.5 * (r_c ** 2 + r_r ** 2)
        return per_pair.mean(), {"accuracy": float((r_c > r_r).float().mean())}

    optimize(cfg, encoder, runner, heads, train_idx, lengths, micro_loss, log, total, resume, par)
    backbone = final_backbone(cfg, par, encoder, backbone)
    if backbone is None:
        return {}  # rank 0 evaluates and writes the run directory
    backbone.eval()
    heads.eval()
    report = {"method": cfg.method, "finetune": cfg.finetune, "num_eval_pairs": n_test,
              **_evaluate(backbone, heads, pairs, test_idx, choice.mode)}
    train_rewards = _rewards(backbone, heads, pairs, train_idx, choice.mode).cpu()

    finish_run_dir(cfg, backbone, tokenizer, heads, hc, report, train_rewards)
    return report

def finetune_device(cfg) -> torch.device:
    """Where fine-tuning runs: ``--device`` (``cuda`` = this process's ``LOCAL_RANK`` GPU)."""
    from prefcore.train.distributed import rank_device

    return torch.device(rank_device(cfg.device))


def prepare_model(cfg, backbone: nn.Module, extra: dict | None = None) -> tuple[nn.Module, dict, nn.ModuleDict]:
    """Train mode, dropout off, checkpointing, LoRA; the method's heads on the hidden size, on the
    backbone's device: ``(backbone to train, head config, heads)``."""
    from prefcore.train.rm.methods import build_heads

    torch.manual_seed(cfg.seed)
    backbone.train()
    if cfg.disable_dropout:
        _disable_dropout(backbone)
    if cfg.gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    hidden = int(backbone.config.hidden_size)
    if cfg.finetune == "lora":
        if cfg.gradient_checkpointing:
            backbone.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        backbone = _apply_lora(backbone, cfg)
    hc = {"method": cfg.method, "trunk_layers": int(cfg.trunk_layers), "trunk_width": int(cfg.trunk_width),
          "in_features": hidden}
    if cfg.method == "gmm":
        hc["k"] = int(cfg.k)
    hc.update(extra or {})
    return backbone, hc, build_heads(hc).to(_device(backbone))


def par_note(par: Parallel) -> str:
    return "" if par.world == 1 else f", {par.mode.upper()} over {par.world} processes"


def final_backbone(cfg, par: Parallel, encoder: Encoder, backbone: nn.Module, extra: dict | None = None):
    """The trained backbone as a plain (unsharded) module on rank 0, None on the other ranks.
    Under FSDP2 the full weights are gathered (a collective) into a backbone rank 0 loads again
    from ``cfg.backbone`` and prepares as before (LoRA)."""
    if par.mode != "fsdp":
        return backbone if par.rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from prefcore.train.rm.sources import load_text_encoder

    full = get_model_state_dict(encoder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if par.rank != 0:
        return None
    fresh, _ = prepare_model(cfg, load_text_encoder(cfg.backbone, str(finetune_device(cfg)))[0], extra)[:2]
    Encoder(fresh).load_state_dict(full)
    return fresh


def start_run_dir(cfg, par: Parallel | None = None) -> tuple[MetricsLog | None, dict | None]:
    """``(metrics log, checkpoint to resume from or None)``; the log is None on ranks other than
    0 (rank 0 writes). A new run clears what an older run left in ``OUT``; ``--resume`` checks that
    the settings and data are those of the checkpointed run and cuts the metrics log back to the
    checkpoint's step; every rank reads the checkpoint."""
    from prefcore.train.rm.trainer import _saved_config, check_resume_config

    par = par or Parallel()
    config_path = os.path.join(cfg.out, "config.json")
    log = MetricsLog(os.path.join(cfg.out, METRICS)) if par.rank == 0 else None
    state = None
    if cfg.resume:
        path = os.path.join(cfg.out, FINETUNE_CHECKPOINT)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume: no {FINETUNE_CHECKPOINT} in {cfg.out!r} (start without --resume)")
        check_resume_config(cfg, config_path)
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("world", 1) != par.world:
            raise ValueError(f"resume: the checkpoint was written by {state.get('world', 1)} process(es); resume "
                             f"it with as many (this run has {par.world}): the data order depends on it")
        if log is not None:
            log.truncate_after(lambda rec: rec.get("stage") == "finetune" and rec["step"] <= state["step"])
    elif par.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        for stale in ("checkpoint.pt", FINETUNE_CHECKPOINT, METRICS, "report.json"):
            if os.path.exists(os.path.join(cfg.out, stale)):
                os.remove(os.path.join(cfg.out, stale))
        atomic_write_json(config_path, _saved_config(cfg))
    par.barrier()
    return log, state


def finish_run_dir(cfg, backbone: nn.Module, tokenizer, heads: nn.ModuleDict, hc: dict, report: dict,
                   train_rewards: torch.Tensor) -> None:
    """The self-contained run directory (module docstring), each file written atomically."""
    from prefcore.train.rm.rmdir import save_backbone_dir, write_reward_stats
    from prefcore.train.rm.trainer import save_heads

    out = cfg.out
    backbone, heads = backbone.cpu(), heads.cpu()
    if cfg.finetune == "lora":
        backbone.save_pretrained(os.path.join(out, "adapter"))
        merged = backbone.merge_and_unload()
    else:
        merged = backbone
    if cfg.gradient_checkpointing:
        merged.gradient_checkpointing_disable()
    save_backbone_dir(merged, tokenizer, out)
    save_heads(heads, hc, out)
    write_reward_stats(out, train_rewards)
    atomic_write_json(os.path.join(out, "report.json"), report)
    print(f"prefcore train-rm [{cfg.method}, finetune {cfg.finetune}] → {out}\n"
          + "\n".join(f"{k:<20}  {v:.4f}" if isinstance(v, float) else f"{k:<20}  {v}" for k, v in report.items()))


class LiveFeatures:
    """``features[idx]`` → the pooled backbone features ``(len(idx), H)`` float32 of the texts
    ``idx``, computed now (with gradients when enabled): lets the frozen path's losses
    (:func:`prefcore.train.rm.methods.stages`) train the backbone too."""

    def __init__(self, encoder: nn.Module, rows: list[list[int]], hidden: int, bf16: bool, packing: str = "plain"):
        from prefcore.models.packing import attention_per_token, transformers_base

        self.encoder, self.rows, self.bf16, self.packing = as_encoder(encoder), rows, bf16, packing
        self.shape = (len(rows), hidden)
        self.attention_per_token = attention_per_token(transformers_base(_unwrap_ddp(self.encoder).backbone).config) \
            if packing == "packed" else 0.0

    def dim(self) -> int:
        return 2

    def __getitem__(self, idx) -> torch.Tensor:
        from dataclasses import astuple

        from prefcore.data.batching import pad_rows
        from prefcore.models.packing import pack_texts, text_pack_width

        idx = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        device = _device(self.encoder)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.packing == "packed":  # several texts per row: little padding in the linear layers
                rows = [self.rows[i] for i in idx]
                width = text_pack_width([len(r) for r in rows], self.attention_per_token)
                f = self.encoder("texts-packed", *astuple(pack_texts(rows, device, width)))
            else:
                ids, mask = pad_rows([self.rows[i] for i in idx], 0)
                f = self.encoder("texts", ids.to(device), mask.to(device).bool())
        return f.float()

    @torch.no_grad()
    def all(self, batch: int = 16) -> torch.Tensor:
        return torch.cat([self[list(range(k, min(k + batch, self.shape[0])))] for k in range(0, self.shape[0], batch)])


def tokenize_texts(tokenizer, texts: Sequence[tuple[str, str]], max_length: int,
                   too_long: str) -> tuple[list[list[int]], list[int], str]:
    """``(rows, kept indices, log line)``: ``prefix + prompt + "\n\n" + response`` per
    ``(prompt, response)``, over-long ones truncated (prompt from the left, prefix kept) or dropped."""
    from prefcore.data.batching import TruncationStats, truncate_example

    prefix = _prefix_ids(tokenizer)
    budget = max_length - len(prefix)
    if budget < 1:
        raise ValueError(f"max_length must leave room for the tokenizer's {len(prefix)} prefix token(s) and a "
                         f"response token, got {max_length}")
    enc = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    stats, rows, kept = TruncationStats(), [], []
    for i, (prompt, response) in enumerate(texts):
        r = enc(response)
        if not r:
            raise ValueError(f"data row {i}: the response tokenizes to zero tokens (nothing to pool)")
        cut = truncate_example(enc(f"{prompt}\n\n"), r, budget, too_long=too_long, stats=stats)
        if cut is None:
            continue
        rows.append(prefix + list(cut))
        kept.append(i)
    if not rows:
        raise ValueError(f"--too_long {too_long}: every text is longer than max_length={max_length}; raise "
                         "--max_length or use --too_long truncate")
    return rows, kept, stats.message(max_length, too_long)


def resolve_text_packing(packing: str, backbone: nn.Module):
    """The rated texts' forward: ``packed`` (several texts per row, :func:`pack_texts`) where the
    backbone takes a custom 4-D mask, as for pairs (:func:`resolve_packing`), else ``plain``."""
    from prefcore.models.packing import TEXT_LAYOUT, resolve_packing

    return resolve_packing(packing, backbone, TEXT_LAYOUT)


def _finetune_ratings(cfg, ds, kind: str, backbone: nn.Module, tokenizer, par: Parallel) -> dict:
    """gmm and mean-var: the frozen path's losses (fused ``gmm_nll``; the Gaussian NLL) on live
    features of the backbone being trained; evaluation as the frozen path's, on the fine-tuned
    model's held-out features."""
    from prefcore.train.rm.data import RatingsData, RMData, held_out_count
    from prefcore.train.rm.methods import evaluate, gating_stage, quantile_stage, stages
    from prefcore.train.rm.sources import ratings_tensors
    from prefcore.train.rm.trainer import training_rewards

    if kind == "attributes" and len(ds.attributes) != 1:
        raise ValueError(f"method {cfg.method!r} models one score distribution per item, but {cfg.data!r} has "
                         f"{len(ds.attributes)} attributes {tuple(ds.attributes)}: pass one with --attributes")
    records = list(ds.records)
    rows, kept, trunc = tokenize_texts(tokenizer, [(r.prompt, r.response) for r in records], cfg.max_length,
                                       cfg.too_long)
    scores, mask, names = ratings_tensors(ds, kind)
    keep = torch.tensor(kept)
    scores, mask = scores[keep], mask[keep]
    n = len(rows)
    n_test = held_out_count(n, cfg.eval_fraction, "ratings", source=cfg.data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    test_idx, train_idx = perm[:n_test], perm[n_test:]

    qrm = cfg.method == "qrm"
    pairs_ds = _qrm_pairs(cfg) if qrm else None
    hidden = int(backbone.config.hidden_size)
    extra = {"num_attributes": len(names), "prompt_features": hidden, "non_crossing": bool(cfg.non_crossing),
             "attribute_names": list(names)} if qrm else None
    backbone, hc, heads = prepare_model(cfg, backbone, extra)
    choice = resolve_text_packing(cfg.packing, backbone)
    encoder = Encoder(backbone)
    runner = wrap_encoder(par, encoder)
    live = LiveFeatures(runner, rows, hidden, cfg.bf16, choice.mode)
    device = _device(backbone)  # the stage losses index features[idx] and scores[idx] by item
    train = RatingsData(live, scores.to(device), mask.to(device), names)
    stage = quantile_stage(heads, train, 0) if qrm else stages(cfg.method, heads, RMData(ratings=train), cfg)[0]
    batch_loss = stage.batch_loss
    lengths = [len(rows[i]) for i in train_idx]
    total = total_steps(cfg, len(train_idx), par.world)
    log, resume = start_run_dir(cfg, par)
    if par.rank == 0:
        rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * par.world
        print(f"prefcore train-rm [{cfg.method}, finetune {cfg.finetune}{par_note(par)}]: {len(records)} rated texts, "
              f"{n - n_test} train / {n_test} held out; {choice.reason}; {trunc}; {total} steps of {rows_per_step} "
              "texts", flush=True)

    def micro_loss(part: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = batch_loss(torch.tensor(part))
        return loss, metrics

    optimize(cfg, encoder, runner, heads, train_idx, lengths, micro_loss, log, total, resume, par)
    backbone = final_backbone(cfg, par, encoder, backbone, extra)
    if backbone is None:
        return {}  # rank 0 evaluates and writes the run directory
    backbone.eval()
    heads.eval()
    # the (now fixed) features and the heads on the CPU, where the frozen path's gating and evaluation run
    heads.cpu()
    feats = LiveFeatures(backbone, rows, hidden, cfg.bf16).all().cpu()
    prompt_feats = LiveFeatures(backbone, prompt_rows(tokenizer, [r.prompt for r in records], cfg.max_length, kept),
                                hidden, False).all().cpu() if qrm else None
    split = lambda idx: RatingsData(feats[idx], scores[idx], mask[idx], names,  # noqa: E731
                                    prompt_features=None if prompt_feats is None else prompt_feats[idx])
    pairs_train = pairs_test = None
    if qrm:
        # stage 2 as on the frozen path: the gate on the fine-tuned model's (now fixed) features
        pairs_train, pairs_test = _pair_features(cfg, pairs_ds, backbone, tokenizer, hidden)
        from prefcore.train.loop import run_stage

        gate = gating_stage(heads, pairs_train, cfg.gate_steps)
        # (a resumed run redoes this short stage from its start: same seed, same result)
        MetricsLog(os.path.join(cfg.out, METRICS)).truncate_after(lambda rec: rec.get("stage") != "gating")
        run_stage(gate.name, 1, heads, gate.params, gate.batch_loss, gate.n_items, cfg.loop_config(gate.steps),
                  cfg.out, done_stages=["quantile"], progress=cfg.progress)
        heads.eval()
    with torch.no_grad():
        test = RMData(ratings=split(torch.tensor(test_idx)), pairs=pairs_test)
        report = {"method": cfg.method, "finetune": cfg.finetune, **evaluate(cfg.method, heads, test, cfg)}
        rewards = training_rewards(heads, hc, RMData(ratings=split(torch.tensor(train_idx)), pairs=pairs_train))
    finish_run_dir(cfg, backbone, tokenizer, heads, hc, report, rewards)
    return report


def prompt_rows(tokenizer, prompts: Sequence[str], max_length: int, kept: Sequence[int] | None = None) -> list[list[int]]:
    """``prefix + prompt`` token ids (the end kept within ``max_length``), as the scorer embeds a
    prompt for the qrm gate; ``kept`` selects records."""
    prefix = _prefix_ids(tokenizer)
    budget = max(1, max_length - len(prefix))
    idx = range(len(prompts)) if kept is None else kept
    rows = []
    for i in idx:
        ids = list(tokenizer(prompts[i], add_special_tokens=False)["input_ids"])[-budget:]
        rows.append(prefix + ids)
    return rows


def _qrm_pairs(cfg):
    """The ``--pairs`` file of a qrm run (its gating stage), loaded and checked before training."""
    from prefcore.train.rm.sources import PAIR_FORMATS, _load

    if not os.path.isfile(cfg.pairs):
        raise FileNotFoundError(f"pairs must be an existing JSONL/Parquet file, got {cfg.pairs!r}")
    if cfg.pairs_format not in PAIR_FORMATS:
        raise ValueError(f"pairs_format must be one of {PAIR_FORMATS}, got {cfg.pairs_format!r}")
    return _load(cfg.pairs, cfg.pairs_format, "pairs", cfg)


@torch.no_grad()
def _pair_features(cfg, pairs_ds, backbone: nn.Module, tokenizer, hidden: int):
    """``(train, held-out)`` :class:`PairsData` of the gating pairs: the fine-tuned model's
    features of ``prompt + chosen``, ``prompt + rejected`` and the prompt."""
    from prefcore.train.rm.data import PairsData, held_out_count

    recs = list(pairs_ds.records)
    rows_c, _, _ = tokenize_texts(tokenizer, [(r.prompt, r.chosen) for r in recs], cfg.max_length, "truncate")
    rows_r, _, _ = tokenize_texts(tokenizer, [(r.prompt, r.rejected) for r in recs], cfg.max_length, "truncate")
    feats = [LiveFeatures(backbone, rows, hidden, False).all().cpu() for rows in
             (rows_c, rows_r, prompt_rows(tokenizer, [r.prompt for r in recs], cfg.max_length))]
    data = PairsData(*feats)
    n = len(data)
    n_test = held_out_count(n, cfg.eval_fraction, "pairs", source=cfg.pairs)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919))
    return data.subset(perm[n_test:]), data.subset(perm[:n_test])


def total_steps(cfg, n_train: int, world: int = 1) -> int:
    """``max_steps``, else ``num_train_epochs`` epochs of ``n_train`` rows: an epoch is as many
    steps as the length-grouped sampler yields, ``ceil(n_train / rows per step)`` (rows per step
    over all ``world`` processes)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = -(-n_train // (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world))
    return max(1, math.ceil(cfg.num_train_epochs * per_epoch))


FINETUNE_CHECKPOINT = "finetune_checkpoint.pt"


@dataclass
class Parallel:
    """How this process takes part in fine-tuning: ``mode`` ``single`` (one process), ``ddp`` or
    ``fsdp`` (torchrun); ``rank`` of ``world``; ``own_group``: this run created the process group."""

    mode: str = "single"
    rank: int = 0
    world: int = 1
    own_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def start_parallel(cfg) -> Parallel:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) when launched with several processes."""
    from prefcore.train.distributed import maybe_init, world

    own = maybe_init(cfg.device)
    rank, size = world()
    return Parallel("fsdp" if cfg.fsdp else "ddp" if size > 1 else "single", rank, size, own)


def wrap_encoder(par: Parallel, encoder: Encoder) -> nn.Module:
    """What the training steps call: ``encoder`` itself (one process), its DDP wrapper, or
    ``encoder`` sharded in place with FSDP2 (``fully_shard`` per decoder layer, then the encoder).
    The heads are small and stay replicated; :func:`optimize` all-reduces their gradients."""
    if par.mode == "fsdp":
        from prefcore.models.packing import transformers_base
        from prefcore.train.distributed import shard_decoder_layers

        shard_decoder_layers(encoder, transformers_base(encoder.backbone))
        return encoder
    if par.mode == "ddp":
        device = _device(encoder)
        return nn.parallel.DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=_has_unused_parameters(encoder))
    return encoder


def _has_unused_parameters(encoder: Encoder) -> bool:
    """Whether a trainable parameter gets no gradient from the pooled features (a BERT pooler, a
    task head): then DDP must look for unused parameters every step (which costs a graph
    traversal, so it is asked for only then). Probed with one 2-token text; RNG and gradients
    are left as they were."""
    device = _device(encoder)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        feats = encoder("texts", torch.zeros(1, 2, dtype=torch.long, device=device),
                        torch.ones(1, 2, dtype=torch.bool, device=device))
        feats.float().sum().backward()
    unused = any(p.requires_grad and p.grad is None for p in encoder.parameters())
    encoder.zero_grad(set_to_none=True)
    return unused


def _grad_norm(backbone_grads: list[torch.Tensor], head_grads: list[torch.Tensor], par: Parallel) -> float:
    """The global L2 norm of every gradient: FSDP2's backbone gradients are shards (summed over
    ranks), the heads' are replicated (counted once). One host sync."""
    from prefcore.train.distributed import all_reduce_sum

    def squares(grads: list[torch.Tensor]) -> torch.Tensor:
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if not local:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in local]).double().pow(2).sum()

    sq = squares(backbone_grads)
    if par.mode == "fsdp":
        sq = all_reduce_sum(sq, par.world)
    heads = squares(head_grads)
    return float((sq.to(heads.device) + heads).sqrt())


def _checkpoint_state(par: Parallel, encoder: nn.Module, opt_backbone) -> tuple[dict, dict]:
    """The encoder's and its optimizer's full (unsharded) state; a collective under FSDP2 (rank 0
    receives the tensors, on CPU)."""
    if par.mode != "fsdp":
        return encoder.state_dict(), opt_backbone.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(encoder, options=opts), get_optimizer_state_dict(encoder, opt_backbone, options=opts)


def _load_encoder_state(par: Parallel, encoder: nn.Module, opt_backbone, model_sd: dict, optim_sd: dict) -> None:
    if par.mode != "fsdp":
        encoder.load_state_dict(model_sd)
        opt_backbone.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(encoder, model_sd, options=opts)
    set_optimizer_state_dict(encoder, opt_backbone, optim_sd, options=opts)


def optimize(cfg, encoder: Encoder, runner: nn.Module, heads: nn.Module, train_idx: Sequence[int],
             lengths: Sequence[int], micro_loss: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]],
             log: MetricsLog | None, total: int, resume: dict | None = None, par: Parallel | None = None) -> None:
    """The optimisation loop shared by every method: ``total`` AdamW steps (backbone at
    ``learning_rate``, heads at ``head_learning_rate``; warm-up + decay), each over
    ``per_device_train_batch_size × gradient_accumulation_steps × world`` rows of ``train_idx``
    from a length-grouped sampler (``lengths[j]`` pads row ``train_idx[j]``; every process draws
    the same batches); ``micro_loss(rows)`` is the mean loss of one micro-batch and its metrics,
    run through ``runner`` (``encoder`` or its DDP/FSDP2 form). The step's loss is the mean over
    all its rows, whichever process and micro-batch computed them, so a run over N processes
    takes the steps of the one-process run with N times the accumulation (up to rounding).

    Under torchrun each process takes every ``world``-th row of the step's batch, in as many
    micro-batches as the fullest process needs (a process with no rows left runs a zero-weight
    micro-batch, so every process joins each collective); DDP/FSDP2 average the backbone's
    gradients once per step, the heads' are all-reduced here; metrics are summed over processes
    and rank 0 logs them (``log`` is None elsewhere).

    Every ``checkpoint_every`` steps and after the last, ``OUT/finetune_checkpoint.pt`` is written
    atomically by rank 0: encoder (backbone or LoRA model, unsharded) and head weights, both
    optimizers, schedulers, RNG, and the position in the data order (epoch and batches done; the
    order is a function of seed and epoch). ``resume`` (such a checkpoint) restores all of it, so
    the run ends as the uninterrupted run would. Calls :data:`AFTER_STEP` after each step."""
    from prefcore._io import atomic_torch_save
    from prefcore.data.batching import LengthGroupedBatchSampler
    from prefcore.train.distributed import all_reduce_sum

    par = par or Parallel()
    micro = cfg.per_device_train_batch_size
    sampler = LengthGroupedBatchSampler(lengths, micro * cfg.gradient_accumulation_steps * par.world, shuffle=True,
                                        seed=cfg.seed)
    warmup = int(cfg.warmup_ratio * total)
    backbone_params = [p for p in encoder.parameters() if p.requires_grad]
    head_params = list(heads.parameters())
    # two optimizers (same maths as one with two groups): FSDP2's state-dict API takes the
    # optimizer of the sharded module alone. The fused AdamW kernel (CPU and CUDA) is ~3× faster
    # than the per-tensor loop torch picks on CPU; FSDP2's sharded parameters use the default.
    fused = par.mode != "fsdp"
    opt_b = torch.optim.AdamW(backbone_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    opt_h = torch.optim.AdamW(head_params, lr=cfg.head_learning_rate, weight_decay=cfg.weight_decay, fused=True)
    lam = _lr_lambda(cfg.lr_scheduler_type, warmup, total)
    sched_b, sched_h = (torch.optim.lr_scheduler.LambdaLR(o, lam) for o in (opt_b, opt_h))
    bar = None
    if cfg.progress and par.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"train-rm {cfg.method} ({cfg.finetune})", leave=False)
    step, epoch, skip = 0, 0, 0
    if resume is not None:
        _load_encoder_state(par, encoder, opt_b, resume["encoder"], resume["optimizer"])
        heads.load_state_dict(resume["heads"])
        opt_h.load_state_dict(resume["head_optimizer"])
        sched_b.load_state_dict(resume["scheduler"])
        sched_h.load_state_dict(resume["head_scheduler"])
        torch.set_rng_state(resume["rng"])
        step, epoch, skip = int(resume["step"]), int(resume["epoch"]), int(resume["batches_in_epoch"])
        if bar is not None:
            bar.update(step)

    def checkpoint(batches_in_epoch: int) -> None:
        model_sd, optim_sd = _checkpoint_state(par, encoder, opt_b)  # every rank (a collective under FSDP2)
        if par.rank == 0:
            atomic_torch_save(os.path.join(cfg.out, FINETUNE_CHECKPOINT), {
                "step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "total": total,
                "world": par.world, "encoder": model_sd, "optimizer": optim_sd, "heads": heads.state_dict(),
                "head_optimizer": opt_h.state_dict(), "scheduler": sched_b.state_dict(),
                "head_scheduler": sched_h.state_dict(), "rng": torch.get_rng_state()})
        par.barrier()

    while step < total:
        sampler.set_epoch(epoch)
        for b_i, batch in enumerate(sampler):
            if b_i < skip:
                continue  # done before the checkpoint this run resumed from
            if step >= total:
                break
            t0 = time.perf_counter()
            ids = [train_idx[j] for j in batch]
            mine = ids[par.rank::par.world]
            n_micro = -(-(-(-len(ids) // par.world)) // micro)  # the fullest process's micro-batches
            opt_b.zero_grad(set_to_none=True)
            opt_h.zero_grad(set_to_none=True)
            loss_sum, sums = 0.0, {}
            for k in range(n_micro):
                part = mine[k * micro:(k + 1) * micro]
                weight = len(part) / len(ids)  # this micro-batch's share of the step's mean
                last = k == n_micro - 1
                if par.mode == "fsdp":
                    runner.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if last or par.mode != "ddp" else runner.no_sync()
                with sync:
                    loss, metrics = micro_loss(part or ids[:1])  # no rows left: a zero-weight pass
                    # DDP/FSDP2 average over processes: scale each process's share back up
                    (loss * (weight * par.world)).backward()
                loss_sum += float(loss.detach()) * weight
                for key, v in metrics.items():
                    sums[key] = sums.get(key, 0.0) + v * weight
            head_grads = [p.grad for p in head_params if p.grad is not None]
            if par.world > 1 and head_grads:
                flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in head_grads]), par.world) / par.world
                offset = 0
                for g in head_grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
            backbone_grads = [p.grad for p in backbone_params if p.grad is not None]
            grad_norm = _grad_norm(backbone_grads, head_grads, par)
            if cfg.max_grad_norm > 0 and grad_norm > cfg.max_grad_norm:
                coef = cfg.max_grad_norm / (grad_norm + 1e-6)
                for g in backbone_grads + head_grads:
                    g.mul_(coef)
            opt_b.step()
            opt_h.step()
            sched_b.step()
            sched_h.step()
            step += 1
            keys = sorted(sums)
            totals = all_reduce_sum(torch.tensor([loss_sum] + [sums[k_] for k_ in keys], dtype=torch.float64),
                                    par.world).tolist()
            if AFTER_STEP is not None:
                AFTER_STEP(step)
            if log is not None and (step % cfg.log_every == 0 or step == total):
                log.write({"stage": "finetune", "step": step, "loss": totals[0], **dict(zip(keys, totals[1:])),
                           "grad_norm": grad_norm, "lr": opt_b.param_groups[0]["lr"],
                           "head_lr": opt_h.param_groups[0]["lr"], "step_time": time.perf_counter() - t0})
            if step % cfg.checkpoint_every == 0 or step == total:
                checkpoint(b_i + 1)
            if bar is not None:
                bar.update(1)
        epoch += 1
        skip = 0
    if bar is not None:
        bar.close()


@torch.no_grad()
def _rewards(backbone, heads, pairs: TokenizedPairs, idx: Sequence[int], mode: str, batch: int = 16) -> torch.Tensor:
    """Chosen then rejected rewards of the pairs ``idx``, ``(2·len(idx),)``."""
    rc, rr = [], []
    for k in range(0, len(idx), batch):
        c, r = pair_rewards(backbone, heads, pairs, idx[k:k + batch], mode, False)
        rc.append(c.float())
        rr.append(r.float())
    return torch.cat(rc + rr) if rc else torch.zeros(0)


@torch.no_grad()
def _evaluate(backbone, heads, pairs: TokenizedPairs, idx: Sequence[int], mode: str) -> dict:
    r = _rewards(backbone, heads, pairs, idx, mode)
    n = len(idx)
    rc, rr = r[:n], r[n:]
    return {"pairwise_accuracy": float((rc > rr).float().mean()) if n else float("nan"),
            "mean_reward": float(r.mean()) if n else float("nan")}


def load_report(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)
