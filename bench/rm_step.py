"""``python -m bench.rm_step``: one Bradley–Terry reward-model fine-tuning step, prefcore vs TRL's
``RewardTrainer``, on an identical workload.

Both sides fine-tune the same randomly initialised Llama (hidden 256, 4 layers, V = 32000; seeded,
saved once as a ``LlamaForSequenceClassification`` with one label — TRL trains that model, prefcore
loads its base model and puts a ``ScalarHead`` on it) on the same pairs: prompts of 24 random
words, responses of 40–120, 16 pairs per step, ``max_length`` 160, lr 1e-4 (prefcore: backbone and
head), fp32, no gradient checkpointing, dropout off, 2 threads; a second workload shares a
200-word prompt (``max_length`` 360), where prefcore's packed pair forward encodes the prompt once
per pair while TRL encodes it twice. Each implementation runs in a fresh child process (an
ordinary process: no environment variables set here); the step time is the time between the
ends of consecutive optimizer steps (prefcore: ``prefcore.train.rm.finetune.AFTER_STEP``; TRL: a
``TrainerCallback.on_step_end``), after one warm-up step; memory is the rise of the process's RSS
high-water mark over its RSS after the warm-up step. Targets: prefcore ≥ 1.5× TRL's pairs per
second and ≤ 0.8× its peak memory. Results: ``bench/results/rm-step-<machine>-<date>.json``;
README block rendered by ``tools/bench_table.py``. The qrm and gmm rows fine-tune the same model with
those heads on the same texts (``prompt24``: each pair's prompt + chosen response with 8 random
ratings), 32 rated texts per step — the BT step's 32 responses — target: each step ≤ 1.1× the
BT step (the distributional heads must be nearly free).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from bench.policy_step import (PeakRSS, _quantile, _status_kib, build_tokenizer, machine_info, machine_slug,
                               write_results)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ("prefcore", "trl")
# the distributional heads on the same model and texts (prompt24 only): a step of 32 rated texts
# (prompt + response each) against the BT step's 16 pairs (32 responses)
RATINGS_IMPLS = {"prefcore-qrm": "qrm", "prefcore-gmm": "gmm"}
WORKLOADS = {"prompt24": {"prompt_words": 24, "max_length": 160}, "prompt200": {"prompt_words": 200, "max_length": 360}}
TARGETS = {"workload": "prompt24", "min_pairs_per_s_ratio": 1.5, "max_peak_mem_ratio": 0.8,
           "max_head_step_ratio": 1.1}


def setup_config(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab=None, pairs_per_step=4,
                    response_words=(5, 15), learning_rate=1e-4, seed=0, quick=True)
    return dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, vocab=32000, pairs_per_step=16,
                response_words=(40, 120), learning_rate=1e-4, seed=0, quick=False)


def write_model(directory: str, cfg: dict[str, Any]) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer(cfg["vocab"])
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                       num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
                       num_key_value_heads=cfg["num_heads"], max_position_embeddings=512, num_labels=1,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        LlamaForSequenceClassification(mcfg).save_pretrained(directory)
    tok.save_pretrained(directory)


def write_ratings(pairs_path: str, path: str, seed: int) -> None:
    """Each pair's prompt + chosen response as a rated text with 8 random scores in [−1, 1]."""
    rng = random.Random(seed + 2)
    with open(pairs_path) as f, open(path, "w") as out:
        for line in f:
            row = json.loads(line)
            out.write(json.dumps({"prompt": row["prompt"], "response": row["chosen"],
                                  "scores": [rng.uniform(-1, 1) for _ in range(8)]}) + "\n")


def write_pairs(path: str, cfg: dict[str, Any], workload: str, n: int) -> None:
    from prefcore.data import text_world as tw

    rng = random.Random(cfg["seed"])
    words = [w for w in build_tokenizer(cfg["vocab"]).get_vocab() if w.isalnum() and w not in
             (tw.PAD, tw.BOS, tw.EOS, tw.UNK)]
    lo, hi = cfg["response_words"]
    pw = WORKLOADS[workload]["prompt_words"] if not cfg["quick"] else 6 * (1 + (workload == "prompt200"))
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": " ".join(rng.choices(words, k=pw)),
                   "chosen": " ".join(rng.choices(words, k=rng.randint(lo, hi))),
                   "rejected": " ".join(rng.choices(words, k=rng.randint(lo, hi)))}
            f.write(json.dumps(row) + "\n")


class StepClock:
    """Step times from consecutive step ends; the peak memory after the first (warm-up) step."""

    def __init__(self, steps: int):
        self.steps, self.ends, self.mem = steps, [], PeakRSS()
        self.peak_mib = float("nan")

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) == 1:
            self.mem.reset()
        if len(self.ends) == self.steps + 1:
            self.peak_mib = self.mem.peak_mib()

    def result(self) -> dict[str, Any]:
        if len(self.ends) < self.steps + 1:
            raise RuntimeError(f"ran {len(self.ends)} steps, expected {self.steps + 1}")
        times = [b - a for a, b in zip(self.ends, self.ends[1:])][: self.steps]
        return {"step_s_all": times, "peak_mem_mib": self.peak_mib}


def run_prefcore(model_dir: str, data: str, cfg: dict[str, Any], max_length: int, steps: int, work: str,
                 method: str = "bt", pairs: str | None = None) -> dict:
    import prefcore.train.rm.finetune as ft
    from prefcore.train.rm.trainer import TrainRMConfig, train_reward_model

    clock = StepClock(steps)
    ft.AFTER_STEP = lambda step: clock.step_end()
    rows = cfg["pairs_per_step"] * (1 if method == "bt" else 2)
    tc = TrainRMConfig(method=method, finetune="full", data=data, pairs=pairs, backbone=model_dir,
                       out=os.path.join(work, "run"), gate_steps=1,
                       per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                       learning_rate=cfg["learning_rate"], head_learning_rate=cfg["learning_rate"],
                       max_steps=steps + 1, max_length=max_length, trunk_layers=0, lr_scheduler_type="constant",
                       weight_decay=0.0, eval_fraction=0.05, progress=False, log_every=10**6, seed=cfg["seed"])
    train_reward_model(tc)
    return clock.result()


def run_trl(model_dir: str, data: str, cfg: dict[str, Any], max_length: int, steps: int, work: str) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    clock = StepClock(steps)
    args = RewardConfig(output_dir=os.path.join(work, "trl"), per_device_train_batch_size=cfg["pairs_per_step"],
                        gradient_accumulation_steps=1, learning_rate=cfg["learning_rate"], max_length=max_length,
                        max_steps=steps + 1, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        gradient_checkpointing=False, bf16=False, use_cpu=True, disable_dropout=True,
                        logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
                        dataloader_num_workers=0, seed=cfg["seed"])
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True, num_labels=1)
    ds = load_dataset("json", data_files=data, split="train")
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    trainer.add_callback(Clock())
    trainer.train()
    return clock.result()


def child_main(impl: str, model_dir: str, data: str, cfg: dict, max_length: int, steps: int, out_path: str,
               pairs: str | None = None) -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        if impl in RATINGS_IMPLS:
            res = run_prefcore(model_dir, data, cfg, max_length, steps, work, RATINGS_IMPLS[impl], pairs)
        else:
            res = (run_prefcore if impl == "prefcore" else run_trl)(model_dir, data, cfg, max_length, steps, work)
    res["torch_threads"] = torch.get_num_threads()
    res["setup_rss_mib"] = _status_kib("VmRSS") / 1024
    with open(out_path, "w") as f:
        json.dump(res, f)


def run_all(quick: bool, steps: int, workloads: list[str]) -> dict[str, Any]:
    cfg = setup_config(quick)
    load_before = list(os.getloadavg())
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prefcore-rm-step-") as work:
        model_dir = os.path.join(work, "model")
        write_model(model_dir, cfg)
        for wl in workloads:
            max_length = WORKLOADS[wl]["max_length"] if not quick else 64
            data = os.path.join(work, f"{wl}.jsonl")
            write_pairs(data, cfg, wl, cfg["pairs_per_step"] * (steps + 2) * 2)
            results[wl] = {}
            ratings = os.path.join(work, f"{wl}-ratings.jsonl")
            write_ratings(data, ratings, cfg["seed"])
            impls = [*IMPLS, *(RATINGS_IMPLS if wl == TARGETS["workload"] else ())]
            for impl in impls:
                out = os.path.join(work, f"{wl}-{impl}.json")
                cmd = [sys.executable, "-m", "bench.rm_step", "--_child", impl, "--_model-dir", model_dir,
                       "--_data", ratings if impl in RATINGS_IMPLS else data, "--_pairs", data,
                       "--_cfg", json.dumps(cfg), "--_max-length", str(max_length), "--steps", str(steps),
                       "--_out", out]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{impl} child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                with open(out) as f:
                    r = json.load(f)
                xs = r["step_s_all"]
                r.update(step_s={"median": statistics.median(xs), "p20": _quantile(xs, 0.2), "p80": _quantile(xs, 0.8)},
                         pairs_per_s=cfg["pairs_per_step"] / statistics.median(xs))
                results[wl][impl] = r
                print(f"  {wl:<10} {impl:<9} {r['step_s']['median']:.3f} s/step  {r['pairs_per_s']:.1f} pairs/s  "
                      f"peak +{r['peak_mem_mib']:.0f} MiB", flush=True)
    ratios = {wl: {"pairs_per_s_prefcore_over_trl": per["prefcore"]["pairs_per_s"] / per["trl"]["pairs_per_s"],
                   "peak_mem_prefcore_over_trl": per["prefcore"]["peak_mem_mib"] / max(per["trl"]["peak_mem_mib"], 1e-9),
                   **{f"step_{impl.split('-')[1]}_over_bt": per[impl]["step_s"]["median"] / per["prefcore"]["step_s"]["median"]
                      for impl in RATINGS_IMPLS if impl in per}}
              for wl, per in results.items()}
    t = ratios.get(TARGETS["workload"])
    now = dt.datetime.now(dt.timezone.utc)
    return {"bench": "rm_step", "quick": quick, "date": now.date().isoformat(),
            "datetime_utc": now.isoformat(timespec="seconds"),
            "command": "python -m bench.rm_step" + (" --quick" if quick else ""), "machine": machine_info(2),
            "threads": 2, "config": cfg, "steps_measured": steps, "load_avg_before": load_before,
            "load_avg_after": list(os.getloadavg()), "results": results, "ratios": ratios,
            "targets": {**TARGETS, "met": None if t is None else {
                "pairs_per_s": bool(t["pairs_per_s_prefcore_over_trl"] >= TARGETS["min_pairs_per_s_ratio"]),
                "peak_mem": bool(t["peak_mem_prefcore_over_trl"] <= TARGETS["max_peak_mem_ratio"]),
                **{k: bool(v <= TARGETS["max_head_step_ratio"]) for k, v in t.items() if k.endswith("_over_bt")}}}}


def markdown(res: dict[str, Any]) -> str:
    lines = ["| workload | impl | step s (p20–p80) | pairs/s (rated texts/s / 2) | peak MiB |", "|---|---|---|---|---|"]
    for wl, per in res["results"].items():
        for impl, r in per.items():
            s = r["step_s"]
            lines.append(f"| {wl} | {impl} | {s['median']:.3f} ({s['p20']:.3f}–{s['p80']:.3f}) | {r['pairs_per_s']:.1f} | "
                         f"{r['peak_mem_mib']:.0f} |")
    for wl, r in res["ratios"].items():
        heads = "".join(f"; {k[5:-8]} step / bt step {v:.2f}×" for k, v in r.items() if k.endswith("_over_bt"))
        lines.append(f"\n{wl}: prefcore/TRL pairs per second {r['pairs_per_s_prefcore_over_trl']:.2f}×, peak memory "
                     f"{r['peak_mem_prefcore_over_trl']:.2f}×{heads}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rm_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and pairs, 2 measured steps (a smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps after the warm-up step (default 5)")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS), help="only this workload (repeatable)")
    ap.add_argument("--out", default=None, help="results path (default bench/results/rm-step-<machine>-<date>.json)")
    ap.add_argument("--_child", choices=[*IMPLS, *RATINGS_IMPLS], help=argparse.SUPPRESS)
    ap.add_argument("--_pairs", dest="pairs", help=argparse.SUPPRESS)
    ap.add_argument("--_model-dir", dest="model_dir", help=argparse.SUPPRESS)
    ap.add_argument("--_data", dest="data", help=argparse.SUPPRESS)
    ap.add_argument("--_cfg", dest="cfg", help=argparse.SUPPRESS)
    ap.add_argument("--_max-length", dest="max_length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="child_out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    steps = a.steps if a.steps is not None else (2 if a.quick else 5)
    if steps < 1:
        ap.error(f"--steps must be >= 1, got {steps}")
    if a._child:
        child_main(a._child, a.model_dir, a.data, json.loads(a.cfg), a.max_length, steps, a.child_out, a.pairs)
        return 0
    res = run_all(a.quick, steps, a.workload or list(WORKLOADS))
    path = a.out or os.path.join(RESULTS_DIR, f"rm-step-{machine_slug(res['machine'])}-{res['date']}.json")
    write_results(res, path, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
