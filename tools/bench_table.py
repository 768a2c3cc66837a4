#!/usr/bin/env python3
"""Render the README benchmark tables from ``bench/results/*.json``, so table and JSON cannot
disagree.

    python tools/bench_table.py [FILES...]          # print the tables (default: headline files)
    python tools/bench_table.py --readme            # rewrite README.md's generated block
    python tools/bench_table.py --readme --check    # exit 1 if README.md's block is stale

The generated block of README.md lies between ``<!-- bench-table:begin -->`` and
``<!-- bench-table:end -->``. Default files: every JSON in bench/results whose ``headline`` is
true (ordinary-process runs; diagnostic ``--regime`` runs and the older glibc-regime files are
left out), newest last.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.harness import Measurement, limit_cell, markdown_table, summarize  # noqa: E402
from bench.targets import LIMIT_TARGETS, TARGETS, THREADS  # noqa: E402

BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
# One RLOO step, prefcore vs TRL (bench/policy_step.py), in a block of its own.
PS_BEGIN, PS_END = "<!-- policy-step:begin -->", "<!-- policy-step:end -->"
# prefcore serve-rm under load (bench/serve_rm.py).
SR_BEGIN, SR_END = "<!-- serve-rm:begin -->", "<!-- serve-rm:end -->"
# one reward-model fine-tuning step, prefcore vs TRL's RewardTrainer (bench/rm_step.py).
RS_BEGIN, RS_END = "<!-- rm-step:begin -->", "<!-- rm-step:end -->"
README = os.path.join(ROOT, "README.md")
NO_RESULTS = ("*No headline (ordinary-process) results are recorded in `bench/results/` yet: run `python -m bench`, "
              "then `python tools/bench_table.py --readme`.*")


def headline_files() -> list[str]:
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if data.get("headline") is True:
            files.append((data.get("datetime_utc", data.get("date", "")), path))
    return [p for _, p in sorted(files)]


def policy_step_files() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "bench", "results", "policy-step-*.json")))


def render_policy_step(path: str) -> str:
    """The table ``bench.policy_step`` prints, under a line naming the file, machine and load."""
    from bench.policy_step import markdown

    with open(path) as f:
        res = json.load(f)
    m = res["machine"]
    head = (f"`{os.path.relpath(path, ROOT)}`: {res['datetime_utc']}, {m['cpu']} ({m['logical_cores']} logical "
            f"cores), {res['threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}, "
            f"trl {m['trl']}; load average before {res['load_avg_before'][0]:.2f}, after "
            f"{res['load_avg_after'][0]:.2f}; `{res['command']}`.")
    return head + "\n\n" + markdown(res)


def rm_step_files() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "bench", "results", "rm-step-*.json")))


def render_rm_step(path: str) -> str:
    """The table ``bench.rm_step`` prints, under a line naming the file, machine and load."""
    from bench.rm_step import markdown

    with open(path) as f:
        res = json.load(f)
    m, c = res["machine"], res["config"]
    head = (f"`{os.path.relpath(path, ROOT)}`: {res['datetime_utc']}, {m['cpu']} ({m['logical_cores']} logical cores), "
            f"{res['threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}; "
            f"load average before {res['load_avg_before'][0]:.2f}, after {res['load_avg_after'][0]:.2f}; random Llama "
            f"(hidden {c['hidden_size']}, {c['num_layers']} layers, V = {c['vocab']}), {c['pairs_per_step']} pairs per "
            f"step, {res['steps_measured']} measured steps after one warm-up step, one fresh process per row; "
            f"`{res['command']}`.")
    return head + "\n\n" + markdown(res)


def serve_rm_files() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "bench", "results", "serve-rm-*.json")))


def render_serve_rm(path: str) -> str:
    """The table ``bench.serve_rm`` prints, under a line naming the file, machine and load."""
    from bench.serve_rm import markdown

    with open(path) as f:
        res = json.load(f)
    m, c = res["machine"], res["config"]
    head = (f"`{os.path.relpath(path, ROOT)}`: {res['datetime_utc']}, {m['cpu']} ({m['logical_cores']} logical cores; "
            f"server and clients share them), torch's default {res['server_threads']} threads in the server, torch {m['torch']}, "
            f"fastapi {m['fastapi']}, uvicorn {m['uvicorn']}; load average before {res['load_avg_before'][0]:.2f}, "
            f"after {res['load_avg_after'][0]:.2f}; gmm reward model on a random Llama (hidden {c['hidden_size']}, "
            f"{c['num_layers']} layers, V = {c['vocab']}), texts of {c['prompt_words']} + "
            f"{c['response_words'][0]}–{c['response_words'][1]} words, {c['seconds']:g} s per row after "
            f"{c['warmup_s']:g} s of warm-up; `{res['command']}`.")
    return head + "\n\n" + markdown(res)


def _replace_block(text: str, begin: str, end: str, body: str) -> str:
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    return f"{pre}{begin}\n{body}\n{end}{post}"


def _targets_table(results: list[Measurement], limits: list[dict] | None = None) -> str:
    lines = ["| target (2 threads) | config | measured (lowest–highest process) | met |", "|---|---|---|---|"]
    for s in summarize(results, limits=limits):
        if s.threads != THREADS:
            continue
        for lt in LIMIT_TARGETS:
            if s.op == lt.op and lt.config in s.config and s.mode == lt.mode and s.impl == "prefcore":
                # Files recorded before the limits were measured cannot judge these targets.
                met = "n/a" if not s.limit_fractions else ("yes" if min(s.limit_fractions) >= lt.minimum else "**no**")
                lines.append(f"| {lt.op} {lt.mode} ≥ {100 * lt.minimum:g}% of its limit | {s.config} | "
                             f"{limit_cell(s)} | {met} |")
        for t in TARGETS:
            if s.op == t.op and t.config in s.config and s.mode == t.mode and s.impl == t.baseline and s.speedups:
                met = "yes" if min(s.speedups) >= t.minimum else "**no**"
                lines.append(f"| {t.op} {t.mode} ≥ {t.minimum:g}× {t.baseline} | {s.config} | "
                             f"{min(s.speedups):.2f}–{max(s.speedups):.2f}× | {met} |")
    return "\n".join(lines)


def render(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    results = [Measurement(**m) for m in data["results"]]
    mach = data["machine"]
    rel = os.path.relpath(path, ROOT) if os.path.isabs(path) else path
    head = (f"`{rel}`: {data.get('datetime_utc', data.get('date'))}, {mach['cpu']} ({mach['logical_cores']} logical "
            f"cores, default {mach.get('torch_default_threads', '?')} torch threads), prefcore ISA "
            f"`{mach['prefcore_cpu_isa']}`, torch {mach['torch']}; {data.get('regime', '?')} process, threads "
            f"{data.get('threads')}, {data.get('processes')} processes each; load average at the end "
            f"{' '.join(data.get('load_average_at_end') or ['?'])}"
            + ("; PRELIMINARY (a contended machine)" if data.get("preliminary") else "") + ".")
    env = mach.get("environment") or {}
    if env:
        head += " Environment: " + ", ".join(f"`{k}={v}`" for k, v in sorted(env.items())) + "."
    limits = data.get("limits")
    if limits:
        head += (f" Limits measured in each process (`torch.mm` n×n, a {limits[0]['copy_bytes'] / 2**20:.0f} MiB "
                 "copy): " + "; ".join(
                     f"{lim['threads']}t p{lim['process']}: fp32 {lim['gemm_fp32_gflops']:.0f} (n={lim['gemm_fp32_size']}), "
                     f"bf16 {lim['gemm_bf16_gflops']:.0f} (n={lim['gemm_bf16_size']}) GFLOP/s, copy "
                     f"{lim['copy_gbps']:.1f} GB/s" for lim in limits) + ".")
    warm = data.get("warmup")
    if warm:
        head += (f" Warm-up: untimed calls per row {warm['rule']} (at least {warm['min_calls']} calls and 0.5 s; "
                 f"past {warm['max_calls']} calls the time alone; per-row counts in the JSON).")
    return "\n\n".join([head, markdown_table(results, limits=limits), _targets_table(results, limits)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--readme", action="store_true", help="rewrite (or with --check, compare) README.md's block")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    files = args.files or headline_files()
    body = "\n\n".join(render(p) for p in files) if files else NO_RESULTS
    if not args.readme:
        print(body)
        return 0
    with open(README) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} … {END} block", file=sys.stderr)
        return 1
    new = _replace_block(text, BEGIN, END, body)
    if PS_BEGIN in new and PS_END in new:
        ps = "\n\n".join(render_policy_step(p) for p in policy_step_files()) or "*No policy-step results recorded.*"
        new = _replace_block(new, PS_BEGIN, PS_END, ps)
    if RS_BEGIN in new and RS_END in new:
        rs = "\n\n".join(render_rm_step(p) for p in rm_step_files()) or "*No rm-step results recorded.*"
        new = _replace_block(new, RS_BEGIN, RS_END, rs)
    if SR_BEGIN in new and SR_END in new:
        sr = "\n\n".join(render_serve_rm(p) for p in serve_rm_files()) or "*No serve-rm results recorded.*"
        new = _replace_block(new, SR_BEGIN, SR_END, sr)
    if args.check:
        if new != text:
            print("README.md's benchmark table is stale: run python tools/bench_table.py --readme", file=sys.stderr)
            return 1
        return 0
    tmp = README + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, README)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
