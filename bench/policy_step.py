"""One RLOO step: prefcore (:mod:`prefcore.train.policy`) vs TRL's ``RLOOTrainer`` on CPU.

``python -m bench.policy_step [--quick] [--threads T] [--steps N] [--rounds R]`` writes
``bench/results/policy-step-<machine>-<date>.json`` and prints a markdown table.

**Setup (identical for both).** A randomly initialised ``LlamaForCausalLM`` built in code
(hidden 128, intermediate 256, 2 layers, 4 heads, untied LM head, fp32, seed 0), saved once per
vocabulary to a temporary directory with its tokenizer; *both* trainers load policy and reference
from that directory. Two vocabularies:

* ``small`` — the text world's tokenizer (``TextWorld().tokenizer``: WordLevel over its 115 words);
* ``32k`` — the same WordLevel tokenizer (same pre-tokeniser, ``<bos>`` template, decoder, pad /
  eos) whose vocabulary is the text world's words followed by synthetic words ``w00115 …
  w31999``, 32 000 entries in all. The prompts tokenise to the same ids in both vocabularies;
  only ``V`` (embedding and LM head) and what a random policy samples change.

Prompts: ``TextWorld().prompts(8, seed=0)``, plain text (TRL: a ``{"prompt": ...}`` dataset of
exactly these 8, so every step of both trainers uses the same 8 prompts). 4 generations each
(32 completions), 32 new tokens at temperature 1 (no top-k / top-p), the same Python reward
function (the text world's exact population mean rating, TRL's ``reward_funcs`` convention),
KL coefficient 0.05 in the reward (prefcore ``kl_coef`` = TRL ``beta``, k1 estimator in both),
learning rate 1e-5, AdamW (``adamw_torch``, no weight decay, constant schedule), grad-norm clip
1.0, ratio clip 0.2, one optimisation step per rollout (TRL: ``per_device_train_batch_size=32``
completions, ``gradient_accumulation_steps=1``, ``num_iterations=1``; prefcore: 8 prompts per
micro-batch, one micro-batch). TRL: no vLLM, ``report_to=[]``, no saving, no logging steps inside
the run, no gradient checkpointing (prefcore's default is off; TRL's default ``True`` would trade
time for memory, so it is switched off to keep the setups identical).

**Precision** (``--precision``, repeatable; default both). ``fp32``: everything in float32.
``bf16``: prefcore ``bf16=True`` (``torch.autocast("cpu", torch.bfloat16)`` around sampling and
the log-prob passes, whose fused LM-head op then takes its bf16 path; fp32 master weights and
AdamW) and TRL ``bf16=True`` (the Trainer's CPU bf16 autocast through accelerate). The rows are
labelled ``prefcore``/``trl`` (fp32) and ``prefcore bf16``/``trl bf16``; the ratios are taken
within a precision, plus prefcore bf16 over prefcore fp32.

**What is timed.** Each implementation runs one warm-up step (not recorded: it allocates the
AdamW state and warms caches) and then ``--steps`` steps; per step the wall time and a split:

* ``generate`` — sampling the completions. prefcore: ``_rollout`` (prompt padding, KV-cache
  sampling); TRL: ``_generate`` (prompt tokenisation, ``model.generate``, decoding, length
  metrics).
* ``score`` — the reward. prefcore: decoding + the reward call + utility; TRL:
  ``_calculate_rewards`` (the reward call and its tensor bookkeeping).
* ``update`` — everything else in the step: the no-grad log-prob passes of the policy and the
  reference (also reported alone as ``ref_old_logprobs``), the advantages, the loss forward and
  backward, grad clipping and the optimiser step (TRL: plus the Trainer's per-step bookkeeping).

TRL's split comes from wrapping those bound methods of the trainer instance and timing the step
from the ``on_step_begin`` to the ``on_step_end`` callback (the window holds generation,
scoring, loss, backward, clipping, optimiser and scheduler steps; it leaves out fetching the
8-prompt batch from the data loader and the Trainer's log/save/eval hook, which does nothing
here); ``update`` is that step time minus ``generate`` and ``score``. prefcore's step is
``PolicyTrainer.train_step()`` timed around the call, its split taken from its own
``time/generate`` / ``time/score`` / ``time/update`` metrics.

**Memory.** Peak RSS of the steps beyond the setup: after the trainer is built (TRL: at
``on_train_begin``, after the Trainer has made its optimiser and data loader), ``VmHWM`` is reset
to the current RSS (``/proc/self/clear_refs``) and the rise of ``VmHWM`` over that RSS by the end
of the last step is reported (warm-up included: the AdamW state belongs to a step's footprint).

**Processes.** Every (implementation, vocabulary) run is its own fresh child process (same
interpreter, environment, glibc defaults and ``torch.set_num_threads``): a process's RSS
high-water mark cannot be split between two trainers, and the allocator state one trainer leaves
behind would change the other's time and memory. The children of one vocabulary run back to
back, and with ``--rounds 2`` in the order prefcore, TRL, TRL, prefcore, so a machine-load drift
hits both alike; step times of all rounds are pooled (median and 20th–80th percentiles) and the
peak memory is the largest of the rounds. The step-time ratio is ``median(TRL) /
median(prefcore)`` — TRL's seconds per step over prefcore's, i.e. prefcore's steps per second
over TRL's. The load average before and after is recorded: on a shared machine the absolute
numbers are only comparable within one file.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ("prefcore", "trl")
PRECISIONS = ("fp32", "bf16")
VOCABS = {"small": None, "32k": 32000}  # None: the text world's own vocabulary
PHASES = ("generate", "score", "update")
# issue 19: at V = 32k, prefcore bf16 faster than prefcore fp32 and ≥ 3× TRL bf16's steps/s.
TARGETS = {"vocab": "32k", "min_steps_per_s_ratio": 1.3, "max_peak_mem_ratio": 0.7,
           "min_bf16_steps_per_s_ratio": 3.0, "min_prefcore_bf16_over_fp32": 1.0}


def label(impl: str, precision: str) -> str:
    """The results key of one implementation at one precision: ``prefcore``, ``trl bf16``, ..."""
    return impl if precision == "fp32" else f"{impl} {precision}"


# ---- setup shared by both implementations -------------------------------------------------------

def setup_config(quick: bool) -> dict[str, Any]:
    """The benchmark's sizes and settings (``--quick``: 2 prompts × 2 generations, 8 tokens)."""
    return {
        "num_prompts": 2 if quick else 8, "num_generations": 2 if quick else 4,
        "max_completion_length": 8 if quick else 32, "hidden_size": 128, "intermediate_size": 256,
        "num_layers": 2, "num_heads": 4, "learning_rate": 1e-5, "kl_coef": 0.05, "max_grad_norm": 1.0,
        "epsilon": 0.2, "temperature": 1.0, "seed": 0,
    }


def build_tokenizer(vocab_size: int | None):
    """The text world's tokenizer, or the same WordLevel tokenizer with its vocabulary extended by
    synthetic words ``w<id>`` to ``vocab_size`` entries (module docstring)."""
    from prefcore.data import text_world as tw

    if vocab_size is None:
        return tw.TextWorld().tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = dict(tw._WORD_ID)
    if vocab_size < len(words):
        raise ValueError(f"vocab_size must be >= the text world's {len(words)} words, got {vocab_size}")
    for i in range(len(words), vocab_size):
        words[f"w{i:05d}"] = i
    tok = Tokenizer(models.WordLevel(words, unk_token=tw.UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{tw.BOS} $A", pair=f"{tw.BOS} $A $B",
                                                       special_tokens=[(tw.BOS, words[tw.BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=tw.UNK, pad_token=tw.PAD, bos_token=tw.BOS,
                                   eos_token=tw.EOS, padding_side="left", model_max_length=1024)


def write_model(directory: str, vocab: str, cfg: dict[str, Any]) -> None:
    """Save the random Llama policy (seeded) and its tokenizer to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(VOCABS[vocab])
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                       num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
                       num_key_value_heads=cfg["num_heads"], max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = LlamaForCausalLM(mcfg)
    g = model.generation_config
    g.pad_token_id, g.bos_token_id, g.eos_token_id = mcfg.pad_token_id, mcfg.bos_token_id, mcfg.eos_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def prompts_and_reward(cfg: dict[str, Any]) -> tuple[list[str], Callable[..., list[float]]]:
    from prefcore.data.text_world import TextWorld

    world = TextWorld()
    return world.prompts(cfg["num_prompts"], seed=0), world.reward_function()


# ---- memory ---------------------------------------------------------------------------------

def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


class PeakRSS:
    """Rise of the process's RSS high-water mark over its RSS at :meth:`reset`, in MiB."""

    def __init__(self) -> None:
        self.base_kib = 0

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        self.base_kib = _status_kib("VmRSS")

    def peak_mib(self) -> float:
        return max(0, _status_kib("VmHWM") - self.base_kib) / 1024


# ---- the two implementations (run in a child process) --------------------------------------------

def run_prefcore(model_dir: str, cfg: dict[str, Any], steps: int, work: str, bf16: bool) -> dict[str, Any]:
    from prefcore.train.policy import PolicyConfig
    from prefcore.train.policy.trainer import PolicyTrainer

    prompts, reward = prompts_and_reward(cfg)
    pc = PolicyConfig(algo="rloo", model_name_or_path=model_dir, num_generations=cfg["num_generations"],
                      per_device_train_batch_size=cfg["num_prompts"], gradient_accumulation_steps=1,
                      max_completion_length=cfg["max_completion_length"], temperature=cfg["temperature"],
                      learning_rate=cfg["learning_rate"], kl_coef=cfg["kl_coef"], kl_estimator="k1",
                      max_grad_norm=cfg["max_grad_norm"], epsilon=cfg["epsilon"], seed=cfg["seed"],
                      max_steps=steps + 1, save_steps=10**9, output_dir=os.path.join(work, "prefcore-run"),
                      no_progress=True, device="cpu", bf16=bf16)
    trainer = PolicyTrainer(pc, prompts=prompts, reward=reward)
    lp_time = [0.0]
    inner = trainer._logprobs

    def timed_logprobs(*a, **kw):  # the no-grad old-policy and reference passes
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            lp_time[0] += time.perf_counter() - t

    trainer._logprobs = timed_logprobs
    mem = PeakRSS()
    setup_rss = _status_kib("VmRSS") / 1024
    mem.reset()
    records = []
    for _ in range(steps + 1):
        lp_time[0] = 0.0
        t0 = time.perf_counter()
        rec = trainer.train_step()
        total = time.perf_counter() - t0
        records.append({"step": total, "generate": rec["time/generate"], "score": rec["time/score"],
                        "update": total - rec["time/generate"] - rec["time/score"],
                        "ref_old_logprobs": lp_time[0], "mean_completion_length": rec["completions/mean_length"]})
    peak = mem.peak_mib()
    trainer.close()
    return {"records": records[1:], "warmup": records[0], "peak_mem_mib": peak, "setup_rss_mib": setup_rss}


def run_trl(model_dir: str, cfg: dict[str, Any], steps: int, work: str, bf16: bool) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    prompts, reward = prompts_and_reward(cfg)
    k = cfg["num_generations"]
    args = RLOOConfig(output_dir=os.path.join(work, "trl-run"), per_device_train_batch_size=cfg["num_prompts"] * k,
                      gradient_accumulation_steps=1, num_generations=k, num_iterations=1,
                      max_completion_length=cfg["max_completion_length"], temperature=cfg["temperature"],
                      top_p=1.0, top_k=0, learning_rate=cfg["learning_rate"], beta=cfg["kl_coef"],
                      max_grad_norm=cfg["max_grad_norm"], epsilon=cfg["epsilon"], weight_decay=0.0,
                      optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0,
                      gradient_checkpointing=False, use_vllm=False, use_cpu=True, bf16=bf16,
                      max_steps=steps + 1, logging_steps=10**9, save_strategy="no", report_to=[],
                      disable_tqdm=True, log_completions=False, seed=cfg["seed"], dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    trainer = RLOOTrainer(model=model_dir, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    phase = {"generate": 0.0, "score": 0.0, "ref_old_logprobs": 0.0}

    def timed(name: str, fn: Callable, only_no_grad: bool = False) -> Callable:
        def wrapper(*a, **kw):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phase[name] += time.perf_counter() - t
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed("ref_old_logprobs", trainer._get_per_token_logps_and_entropies,
                                                       only_no_grad=True)
    mem = PeakRSS()
    out: dict[str, Any] = {"records": []}

    class Timer(TrainerCallback):
        t0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            out["setup_rss_mib"] = _status_kib("VmRSS") / 1024
            mem.reset()

        def on_step_begin(self, args, state, control, **kw):
            for key in phase:
                phase[key] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.t0
            lengths = trainer._metrics["train"]["completions/mean_length"]
            out["records"].append({"step": total, "generate": phase["generate"], "score": phase["score"],
                                   "update": total - phase["generate"] - phase["score"],
                                   "ref_old_logprobs": phase["ref_old_logprobs"],
                                   "mean_completion_length": float(lengths[-1]) if lengths else None})

    trainer.add_callback(Timer())
    trainer.train()
    out["peak_mem_mib"] = mem.peak_mib()
    if len(out["records"]) != steps + 1:
        raise RuntimeError(f"TRL ran {len(out['records'])} steps, expected {steps + 1}")
    out["warmup"] = out["records"].pop(0)
    return out


def child_main(impl: str, precision: str, model_dir: str, cfg: dict[str, Any], steps: int, threads: int,
               out_path: str) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    with tempfile.TemporaryDirectory() as work:
        res = (run_prefcore if impl == "prefcore" else run_trl)(model_dir, cfg, steps, work, precision == "bf16")
    res["torch_threads"] = torch.get_num_threads()
    with open(out_path, "w") as f:
        json.dump(res, f)


# ---- the parent: children, statistics, the results file ------------------------------------------

def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the step records of one implementation's runs (one per round)."""
    recs = [r for run in runs for r in run["records"]]

    def stats(key: str) -> dict[str, float]:
        xs = [r[key] for r in recs]
        return {"median": statistics.median(xs), "p20": _quantile(xs, 0.2), "p80": _quantile(xs, 0.8)}

    lengths = [r["mean_completion_length"] for r in recs if r["mean_completion_length"] is not None]
    return {
        "steps_measured": len(recs), "step_s": stats("step"),
        "phases_s": {p: stats(p) for p in (*PHASES, "ref_old_logprobs")},
        "steps_per_s": 1.0 / statistics.median([r["step"] for r in recs]),
        "peak_mem_mib": max(run["peak_mem_mib"] for run in runs),
        "peak_mem_mib_per_round": [run["peak_mem_mib"] for run in runs],
        "setup_rss_mib": [run["setup_rss_mib"] for run in runs],
        "warmup_step_s": [run["warmup"]["step"] for run in runs],
        "mean_completion_length": statistics.mean(lengths) if lengths else None,
        "step_s_all": [r["step"] for r in recs],
    }


def machine_info(threads: int) -> dict[str, Any]:
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _load() -> list[float]:
    return list(os.getloadavg())


def _run_child(impl: str, precision: str, model_dir: str, cfg: dict[str, Any], steps: int,
               threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        cmd = [sys.executable, "-m", "bench.policy_step", "--_child", impl, "--precision", precision,
               "--_model-dir", model_dir,
               "--_cfg", json.dumps(cfg), "--steps", str(steps), "--threads", str(threads), "--_out", out]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the {label(impl, precision)} child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def run_all(quick: bool, steps: int, rounds: int, threads: int, vocabs: list[str],
            precisions: list[str] | None = None) -> dict[str, Any]:
    precisions = precisions or ["fp32"]
    rows = [(impl, p) for p in precisions for impl in IMPLS]
    cfg = setup_config(quick)
    info = machine_info(threads)
    load_before = _load()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for vocab in vocabs:
        with tempfile.TemporaryDirectory() as model_dir:
            write_model(model_dir, vocab, cfg)
            runs: dict[str, list] = {label(*row): [] for row in rows}
            for r in range(rounds):
                for impl, prec in (rows if r % 2 == 0 else rows[::-1]):
                    runs[label(impl, prec)].append(_run_child(impl, prec, model_dir, cfg, steps, threads))
        results[vocab] = {key: summarize(val) for key, val in runs.items()}
        ratios[vocab] = _ratios(results[vocab])
    tv = TARGETS["vocab"]
    met = None
    if tv in ratios:
        rr = ratios[tv]
        met = {}
        if "steps_per_s_prefcore_over_trl" in rr:
            met["steps_per_s"] = rr["steps_per_s_prefcore_over_trl"] >= TARGETS["min_steps_per_s_ratio"]
            met["peak_mem"] = (rr["peak_mem_prefcore_over_trl"] is not None
                               and rr["peak_mem_prefcore_over_trl"] <= TARGETS["max_peak_mem_ratio"])
        if "bf16_steps_per_s_prefcore_over_trl" in rr:
            met["bf16_steps_per_s"] = rr["bf16_steps_per_s_prefcore_over_trl"] >= TARGETS["min_bf16_steps_per_s_ratio"]
        if "steps_per_s_prefcore_bf16_over_fp32" in rr:
            met["prefcore_bf16_over_fp32"] = (rr["steps_per_s_prefcore_bf16_over_fp32"]
                                              > TARGETS["min_prefcore_bf16_over_fp32"])
    return {
        "benchmark": "policy_step", "date": _dt.date.today().isoformat(),
        "datetime_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info, "threads": threads, "quick": quick, "steps_per_run": steps, "rounds": rounds,
        "load_avg_before": load_before, "load_avg_after": _load(), "wall_s": time.perf_counter() - started,
        "config": {**cfg, "vocab_sizes": {v: VOCABS[v] or len(build_tokenizer(None)) for v in vocabs},
                   "algo": "rloo", "warmup_steps": 1},
        "precisions": precisions,
        "command": "python -m bench.policy_step" + (" --quick" if quick else "")
                   + "".join(f" --precision {p}" for p in precisions if precisions != list(PRECISIONS)),
        "results": results, "ratios": ratios, "targets": TARGETS, "targets_met": met,
    }


def _ratios(per: dict[str, Any]) -> dict[str, Any]:
    """Step-time ratios within one vocabulary (keys present only where both rows ran): prefcore
    over TRL at fp32 and at bf16, and prefcore bf16 over prefcore fp32 — each a seconds-per-step
    quotient, i.e. the steps per second of the first over the second."""
    def speed(a: str, b: str) -> float:
        return per[b]["step_s"]["median"] / per[a]["step_s"]["median"]

    def mem(a: str, b: str) -> float | None:
        return per[a]["peak_mem_mib"] / per[b]["peak_mem_mib"] if per[b]["peak_mem_mib"] > 0 else None

    out: dict[str, Any] = {}
    for prefix, prec in (("", "fp32"), ("bf16_", "bf16")):
        p, t = label("prefcore", prec), label("trl", prec)
        if p in per and t in per:
            out[f"{prefix}steps_per_s_prefcore_over_trl"] = speed(p, t)
            out[f"{prefix}peak_mem_prefcore_over_trl"] = mem(p, t)
    if "prefcore" in per and "prefcore bf16" in per:
        out["steps_per_s_prefcore_bf16_over_fp32"] = speed("prefcore bf16", "prefcore")
    return out


def write_results(res: dict[str, Any], path: str, render: Callable[[dict[str, Any]], str]) -> None:
    """Write a bench's results JSON atomically to ``path``, then print ``render(res)`` and the path
    (shared by the step and server benches)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, path)
    print(render(res))
    print(f"\nwritten {path}")


def machine_slug(info: dict[str, Any]) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"cpu-{info['cpu']}-{info['torch_threads']}t".lower()).strip("-")


def markdown(res: dict[str, Any]) -> str:
    lines = ["| V | impl | step s (p20–p80) | generate | score | update (ref+old lp) | peak MiB | mean len |",
             "|---|---|---|---|---|---|---|---|"]
    for vocab, per in res["results"].items():
        for impl, s in per.items():
            st, ph = s["step_s"], s["phases_s"]
            lines.append(f"| {vocab} | {impl} | {st['median']:.3f} ({st['p20']:.3f}–{st['p80']:.3f}) | "
                         f"{ph['generate']['median']:.3f} | {ph['score']['median']:.3f} | "
                         f"{ph['update']['median']:.3f} ({ph['ref_old_logprobs']['median']:.3f}) | "
                         f"{s['peak_mem_mib']:.1f} | {s['mean_completion_length']:.1f} |")
    for vocab, r in res["ratios"].items():
        for prefix, name in (("", "prefcore/TRL"), ("bf16_", "bf16: prefcore/TRL")):
            if f"{prefix}steps_per_s_prefcore_over_trl" not in r:
                continue
            mem = r[f"{prefix}peak_mem_prefcore_over_trl"]
            lines.append(f"\nV={vocab}: {name} steps per second {r[f'{prefix}steps_per_s_prefcore_over_trl']:.2f}×, "
                         f"peak memory {'n/a' if mem is None else f'{mem:.2f}×'}")
        if "steps_per_s_prefcore_bf16_over_fp32" in r:
            lines.append(f"\nV={vocab}: prefcore bf16/fp32 steps per second "
                         f"{r['steps_per_s_prefcore_bf16_over_fp32']:.2f}×")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.policy_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 measured step, 1 round (a smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per run after the warm-up (default 4)")
    ap.add_argument("--rounds", type=int, default=None, help="child processes per implementation (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every child (default 2)")
    ap.add_argument("--vocab", action="append", choices=list(VOCABS), help="only this vocabulary (repeatable)")
    ap.add_argument("--precision", action="append", choices=list(PRECISIONS),
                    help="fp32 and/or bf16 (repeatable; default both). bf16: prefcore --bf16 (CPU autocast, fp32 "
                         "master weights) and TRL bf16=True")
    ap.add_argument("--out", default=None, help="results path (default bench/results/policy-step-<machine>-<date>.json)")
    ap.add_argument("--_child", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--_model-dir", dest="model_dir", help=argparse.SUPPRESS)
    ap.add_argument("--_cfg", dest="cfg", help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="child_out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads < 1:
        ap.error(f"--threads must be >= 1, got {a.threads}")
    steps = a.steps if a.steps is not None else (1 if a.quick else 4)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 2)
    if steps < 1 or rounds < 1:
        ap.error(f"--steps and --rounds must be >= 1, got {steps} and {rounds}")
    if a._child:
        precision = (a.precision or ["fp32"])[0]
        child_main(a._child, precision, a.model_dir, json.loads(a.cfg), steps, a.threads, a.child_out)
        return 0
    res = run_all(a.quick, steps, rounds, a.threads, a.vocab or list(VOCABS), list(dict.fromkeys(a.precision or PRECISIONS)))
    path = a.out or os.path.join(RESULTS_DIR, f"policy-step-{machine_slug(res['machine'])}-{res['date']}.json")
    write_results(res, path, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
