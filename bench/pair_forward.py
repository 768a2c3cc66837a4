"""Pair forward + backward: the prompt encoded once (``packed``) vs two sequences (``plain``).

``python -m bench.pair_forward [--quick] [--device cpu|cuda] [--threads T] [--out FILE.json]``
prints a markdown table (and writes the JSON only when ``--out`` is given).

**Setup (identical for both).** A randomly initialised ``LlamaModel`` built in code (default:
hidden 256, intermediate 512, 4 layers, 4 heads, 2 KV heads, vocabulary 1000, sdpa attention,
seed 0) and a linear reward head; ``--batch`` pairs whose prompt lengths are drawn uniformly
from ``[P/2, P]`` and response lengths from ``[R/2, R]`` (``--prompt_len P``, ``--response_len
R``), left-padded as a tokenizer would pad them. One call is
:func:`prefcore.models.packing.pair_features` with ``packing="packed"`` or ``"plain"``, the
Bradley–Terry loss ``Σ −log σ(r_c − r_r)`` and its backward into the backbone.

**What is measured** (:func:`bench.harness.measure`): the wall time of repeated calls (median,
20th–80th percentile) after a warm-up, and the peak extra tensor memory of one call (CPU: torch
profiler allocation events; CUDA: ``max_memory_allocated``). ``tokens`` is what the backbone
runs per call, padding included: ``B × (longest P + C + R)`` packed, ``2B × (longest P + max(C,
R))`` plain. Both modes' rewards are compared (``max |Δr|``) so a broken layout cannot look fast.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.harness import _quantile, machine_info, measure
from prefcore._io import atomic_write_text
from prefcore.models.packing import pair_features

MODES = ("packed", "plain")


@dataclass(frozen=True)
class PairBenchConfig:
    batch: int = 8
    prompt_len: int = 384
    response_len: int = 128
    hidden: int = 256
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 1000
    dtype: str = "float32"
    seed: int = 0


QUICK = PairBenchConfig(batch=2, prompt_len=12, response_len=5, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1,
                        vocab=50)


def build(cfg: PairBenchConfig, device: torch.device):
    """``(backbone, head, prompt, chosen, rejected)`` for ``cfg`` on ``device``."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    model = LlamaModel(LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                                   num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                   num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.prompt_len + cfg.response_len,
                                   pad_token_id=0)).to(device=device, dtype=dtype).train()
    head = torch.nn.Linear(cfg.hidden, 1).to(device=device, dtype=dtype)
    rng = random.Random(cfg.seed)

    def segment(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[rng.randrange(1, cfg.vocab) for _ in range(rng.randint(lo, hi))] for _ in range(cfg.batch)]
        width = max(map(len, rows))
        ids = torch.zeros(cfg.batch, width, dtype=torch.long)
        mask = torch.zeros(cfg.batch, width, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding, as a tokenizer pads for a decoder
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids.to(device), mask.to(device)

    p = segment(max(1, cfg.prompt_len // 2), cfg.prompt_len)
    c = segment(max(1, cfg.response_len // 2), cfg.response_len)
    r = segment(max(1, cfg.response_len // 2), cfg.response_len)
    return model, head, p, c, r


def tokens(mode: str, p, c, r) -> int:
    """Backbone tokens per call, padding included (see the module docstring)."""
    lp, lc, lr = (s[1].sum(-1) for s in (p, c, r))
    b = lp.shape[0]
    if mode == "packed":
        return int(b * (lp + lc + lr).max())
    return int(2 * b * (lp + torch.maximum(lc, lr)).max())


def run(cfg: PairBenchConfig, device: torch.device, *, quick: bool) -> dict:
    model, head, p, c, r = build(cfg, device)

    def step(mode: str):
        f = pair_features(model, p, c, r, packing=mode)
        return -F.logsigmoid(head(f.chosen) - head(f.rejected)).sum()

    rewards = {}
    with torch.no_grad():
        for mode in MODES:
            f = pair_features(model, p, c, r, packing=mode)
            rewards[mode] = torch.cat([head(f.chosen), head(f.rejected)]).float()
    results = {}
    timing = dict(warmup=1, warmup_s=0.0, min_reps=1, max_reps=1, budget_s=0.0) if quick else {}
    for mode in MODES:
        times, peak = measure(step, (mode,), {}, "fwd+bwd", device, **timing)
        model.zero_grad(set_to_none=True)
        results[mode] = {"median_ms": _quantile(times, 0.5), "p20_ms": _quantile(times, 0.2),
                         "p80_ms": _quantile(times, 0.8), "reps": len(times), "peak_mb": peak,
                         "tokens": tokens(mode, p, c, r)}
    pk, pl = results["packed"], results["plain"]
    return {
        "config": asdict(cfg), "quick": quick,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device), "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "results": results,
        "max_abs_reward_diff": float((rewards["packed"] - rewards["plain"]).abs().max()),
        "speedup_plain_over_packed": pl["median_ms"] / pk["median_ms"],
        "memory_ratio_packed_over_plain": (pk["peak_mb"] / pl["peak_mb"]) if pk["peak_mb"] and pl["peak_mb"] else None,
    }


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"pairs {cfg['batch']}, prompt ≤ {cfg['prompt_len']}, responses ≤ {cfg['response_len']}, "
             f"Llama {cfg['layers']}×{cfg['hidden']}, {cfg['dtype']}, {res['machine']['device']}, {res['threads']} threads"
             f"{' (quick: measures nothing)' if res['quick'] else ''}", "",
             "| forward | fwd+bwd ms (p20–p80) | peak MiB | tokens |", "|---|---|---|---|"]
    for mode, m in res["results"].items():
        peak = "n/a" if m["peak_mb"] is None else f"{m['peak_mb']:.1f}"
        lines.append(f"| {mode} | {m['median_ms']:.1f} ({m['p20_ms']:.1f}–{m['p80_ms']:.1f}) | {peak} | {m['tokens']} |")
    lines.append("")
    lines.append(f"plain/packed time ×{res['speedup_plain_over_packed']:.2f}; max |Δ reward| {res['max_abs_reward_diff']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pair_forward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one call each: checks the script, measures nothing")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write the results JSON here (atomically)")
    for name, default in asdict(PairBenchConfig()).items():
        ap.add_argument(f"--{name}", type=type(default), default=None, help=f"default {default}")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else PairBenchConfig()
    overrides = {k: getattr(args, k) for k in asdict(base) if getattr(args, k) is not None}
    cfg = PairBenchConfig(**{**asdict(base), **overrides})
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        ap.error(f"--dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    res = run(cfg, device, quick=args.quick)
    print(markdown(res))
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
