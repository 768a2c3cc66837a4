"""``python -m bench.serve_rm``: ``prefcore serve-rm`` under load, batched vs one sample at a time.

A real server process on 127.0.0.1 (a free port) serves a gmm reward model (``--utility
cvar:0.1``) on a random Llama backbone (hidden 256, 4 layers, V = 32000; heads trained for a few
steps by ``prefcore train-rm`` on random-word ratings). N concurrent clients in this process
(asyncio + httpx) each send one sample per request to ``/get_reward`` — OpenRLHF's pattern —
prompts of 24 words and responses of 40–120 words, for a fixed time after a warm-up (bounded:
at most ``--max_requests`` per run; the run stops by itself). Two servers: ``batched``
(``--max_batch_tokens 8192 --max_wait_ms 5``) and ``one-at-a-time`` (``--max_batch_tokens 1``:
every sample is its own model call), each at 1, 8 and 32 clients. Reported: requests per second
and p50/p99 latency; the target: at 32 clients the batched server gives ≥ 5× the one-at-a-time
throughput. Results: ``bench/results/serve-rm-<machine>-<date>.json``; the README block is
rendered from it by ``tools/bench_table.py``. Nothing leaves this machine's loopback.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = {"batched": ["--max_batch_tokens", "8192", "--max_wait_ms", "5"],
         "one-at-a-time": ["--max_batch_tokens", "1", "--max_wait_ms", "0"]}
TARGET = {"clients": 32, "min_throughput_ratio": 5.0}


def setup_config(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab=None, items=24,
                    clients=[1, 4], seconds=1.0, warmup_s=0.3, max_requests=200, prompt_words=6,
                    response_words=(5, 15), max_length=48, seed=0)
    return dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, vocab=32000, items=256,
                clients=[1, 8, 32], seconds=10.0, warmup_s=2.0, max_requests=5000, prompt_words=24,
                response_words=(40, 120), max_length=160, seed=0)


def texts(cfg: dict[str, Any], words: list[str]) -> list[tuple[str, str]]:
    rng = random.Random(cfg["seed"])
    lo, hi = cfg["response_words"]
    return [(" ".join(rng.choices(words, k=cfg["prompt_words"])), " ".join(rng.choices(words, k=rng.randint(lo, hi))))
            for _ in range(cfg["items"])]


def build_run(work: str, cfg: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """A gmm train-rm run on a random Llama backbone (module docstring); returns it and the texts."""
    from transformers import LlamaConfig, LlamaModel

    from bench.policy_step import build_tokenizer
    from prefcore.cli import main as cli
    from prefcore.data import save_jsonl

    tok = build_tokenizer(cfg["vocab"])
    backbone = os.path.join(work, "backbone")
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                       num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
                       num_key_value_heads=cfg["num_heads"], max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        LlamaModel(mcfg).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    words = [w for w in tok.get_vocab() if w.isalnum()]
    pairs = texts(cfg, words)
    rng = random.Random(cfg["seed"] + 1)
    save_jsonl([{"prompt": p, "response": r, "scores": [rng.uniform(-1, 1) for _ in range(6)]} for p, r in pairs],
               os.path.join(work, "ratings.jsonl"))
    run = os.path.join(work, "rm-gmm")
    code = cli(["train-rm", "--method", "gmm", "--data", os.path.join(work, "ratings.jsonl"), "--backbone", backbone,
                "--max_length", str(cfg["max_length"]), "--steps", "20", "--trunk_layers", "0", "--out", run,
                "--progress", "false"])
    if code != 0:
        raise RuntimeError("train-rm failed while building the benchmark's reward model")
    return run, pairs


async def load(url: str, pairs: list[tuple[str, str]], clients: int, seconds: float, warmup_s: float,
               max_requests: int) -> dict[str, Any]:
    """``clients`` concurrent clients, one sample per request, for ``warmup_s`` + ``seconds``;
    only requests that start after the warm-up are counted."""
    import httpx

    latencies: list[float] = []
    errors = 0
    t0 = time.perf_counter()
    start, stop = t0 + warmup_s, t0 + warmup_s + seconds
    counter = iter(range(10**9))

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            now = time.perf_counter()
            if now >= stop or len(latencies) >= max_requests:
                return
            p, r = pairs[next(counter) % len(pairs)]
            resp = await c.post(url + "/get_reward", json={"query": [p + r], "prompts": [p]})
            done = time.perf_counter()
            if resp.status_code != 200 or len(resp.json()["rewards"]) != 1:
                errors += 1
            elif now >= start:
                latencies.append(done - now)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    elapsed = max(1e-9, min(time.perf_counter(), stop) - start)
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")

    return {"clients": clients, "requests": len(lat), "errors": errors, "seconds": elapsed,
            "throughput_rps": len(lat) / elapsed, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan")}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import fastapi
    import uvicorn

    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "platform": platform.platform()}


def run_all(quick: bool) -> dict[str, Any]:
    from prefcore.serve.process import ServerProcess

    cfg = setup_config(quick)
    load_before = list(os.getloadavg())
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="prefcore-serve-bench-") as work:
        run, pairs = build_run(work, cfg)
        for mode, flags in MODES.items():
            # an ordinary server process: the environment as the user has it, torch's default threads
            with ServerProcess([run, "--utility", "cvar:0.1", *flags]) as server:
                results[mode] = []
                for n in cfg["clients"]:
                    r = asyncio.run(load(server.url, pairs, n, cfg["seconds"], cfg["warmup_s"], cfg["max_requests"]))
                    print(f"  {mode:<14} {n:>3} clients: {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                          f"p99 {r['p99_ms']:7.1f} ms  ({r['requests']} requests, {r['errors']} errors)", flush=True)
                    results[mode].append(r)
                import httpx

                results[mode + "/server_stats"] = httpx.get(server.url + "/info").json()["stats"]
    top = cfg["clients"][-1]
    b = next(r for r in results["batched"] if r["clients"] == top)
    o = next(r for r in results["one-at-a-time"] if r["clients"] == top)
    ratio = b["throughput_rps"] / max(o["throughput_rps"], 1e-9)
    now = dt.datetime.now(dt.timezone.utc)
    return {"bench": "serve_rm", "quick": quick, "date": now.date().isoformat(),
            "datetime_utc": now.isoformat(timespec="seconds"), "command": "python -m bench.serve_rm" + (" --quick" if quick else ""),
            "machine": machine_info(), "server_threads": torch.get_num_threads(), "config": cfg, "load_avg_before": load_before,
            "load_avg_after": list(os.getloadavg()), "results": results,
            "ratio": {"clients": top, "throughput_batched_over_one_at_a_time": ratio},
            "target": {**TARGET, "met": bool(top == TARGET["clients"] and ratio >= TARGET["min_throughput_ratio"])}}


def markdown(res: dict[str, Any]) -> str:
    lines = ["| server | clients | requests/s | p50 ms | p99 ms | requests | errors |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        for r in res["results"][mode]:
            lines.append(f"| {mode} | {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['requests']} | {r['errors']} |")
    rt = res["ratio"]
    lines.append(f"\nAt {rt['clients']} clients the batched server answers "
                 f"{rt['throughput_batched_over_one_at_a_time']:.1f}× the requests per second of the one-at-a-time server "
                 f"(target ≥ {TARGET['min_throughput_ratio']:g}× at {TARGET['clients']}: "
                 f"{'met' if res['target']['met'] else 'not met'}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.policy_step import machine_slug, write_results

    ap = argparse.ArgumentParser(prog="python -m bench.serve_rm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 and 4 clients, 1 s each (a smoke test)")
    ap.add_argument("--out", default=None, help="results path (default bench/results/serve-rm-<machine>-<date>.json)")
    a = ap.parse_args(argv)
    res = run_all(a.quick)
    slug = machine_slug({"cpu": res["machine"]["cpu"], "torch_threads": res["server_threads"]})
    path = a.out or os.path.join(RESULTS_DIR, f"serve-rm-{slug}-{res['date']}.json")
    write_results(res, path, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
