"""The benchmark harness every op reuses.

For each :class:`BenchCase` it times every implementation (the fused prefcore op, the eager
reference, the reference under ``torch.compile``, and any extra baselines a case names) in two
modes — ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd`` (forward, ``.sum().backward()`` of
the first output) — and records the median and the 20th/80th percentiles of wall time and the
peak extra memory of one call:

* CPU: the rise of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
  over its RSS before the call. glibc is told to serve every allocation above 128 KiB with
  ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) so freed memory is returned and each call is measured
  from a clean state.
* CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the call.

Results print as a markdown table and are written with the machine description to
``bench/results/<machine>-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class BenchCase:
    """One op at one size. ``make_inputs(device) -> (args, kwargs)``; tensors that need
    gradients come back with ``requires_grad=True``. ``impls`` maps a name to a callable taking
    ``(*args, **kwargs)``; names in ``compile`` are also timed under ``torch.compile`` as
    ``"<name>+compile"``. ``primary`` is the implementation the ratios are computed for."""

    op: str
    config: str
    make_inputs: Callable[[torch.device], tuple[tuple, dict]]
    impls: dict[str, Callable[..., Any]]
    compile: tuple[str, ...] = ("reference",)
    backward: bool = True
    primary: str = "prefcore"

    @property
    def name(self) -> str:
        return f"{self.op} [{self.config}]"


@dataclass
class Measurement:
    op: str
    config: str
    mode: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    peak_mb: float | None
    extra: dict = field(default_factory=dict)


# ---- measuring ------------------------------------------------------------------------------

def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError("benchmarked callable returned no tensor")


def _leaves(args: Sequence, kwargs: dict) -> list[torch.Tensor]:
    vals = list(args) + list(kwargs.values())
    return [v for v in vals if isinstance(v, torch.Tensor) and v.requires_grad]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(fn: Callable, args: Sequence, kwargs: dict, mode: str, leaves: list[torch.Tensor]) -> None:
    if mode == "fwd":
        with torch.no_grad():
            fn(*args, **kwargs)
        return
    for leaf in leaves:
        leaf.grad = None
    _first_tensor(fn(*args, **kwargs)).float().sum().backward()


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _peak_extra_mb(run: Callable[[], None], device: torch.device) -> float | None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    run()
    return max(0, _rss_kib("VmHWM") - base) / 1024


def measure(fn: Callable, args: Sequence, kwargs: dict, mode: str, device: torch.device, *,
            warmup: int = 2, min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0
            ) -> tuple[list[float], float | None]:
    leaves = _leaves(args, kwargs)
    run = lambda: _call(fn, args, kwargs, mode, leaves)  # noqa: E731
    # Warm up for at least `warmup` calls and 1 s: the first ~0.4 s of a process run ~6× slower
    # (measured: the first 60 calls of kl_penalized_advantages take 7 ms, later ones 1.2 ms —
    # first-touch of fresh (huge) pages), which would otherwise land in the first case's timings.
    start = time.perf_counter()
    calls = 0
    while calls < warmup or time.perf_counter() - start < 1.0:
        run()
        calls += 1
    _sync(device)
    peak = _peak_extra_mb(lambda: (run(), _sync(device)), device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, peak


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_case(case: BenchCase, device: torch.device, *, use_compile: bool = True,
             modes: Sequence[str] = MODES, log: Callable[[str], None] = print) -> list[Measurement]:
    args, kwargs = case.make_inputs(device)
    impls: dict[str, Callable] = dict(case.impls)
    if use_compile:
        for name in case.compile:
            impls[f"{name}+compile"] = torch.compile(case.impls[name], dynamic=False)
    out: list[Measurement] = []
    for mode in modes:
        if mode == "fwd+bwd" and not case.backward:
            continue
        for name, fn in impls.items():
            times, peak = measure(fn, args, kwargs, mode, device)
            m = Measurement(case.op, case.config, mode, name, statistics.median(times),
                            _quantile(times, 0.2), _quantile(times, 0.8), len(times), peak)
            log(f"  {case.name:<48} {mode:<8} {name:<22} {m.median_ms:9.3f} ms"
                + (f"  peak +{peak:8.1f} MiB" if peak is not None else ""))
            out.append(m)
    return out


# ---- reporting ------------------------------------------------------------------------------

def ratios(results: list[Measurement], primary: str = "prefcore") -> list[dict]:
    """Speed-up and memory ratio of ``primary`` against every other implementation."""
    rows = []
    keyed = {(m.op, m.config, m.mode, m.impl): m for m in results}
    for m in results:
        if m.impl == primary:
            continue
        p = keyed.get((m.op, m.config, m.mode, primary))
        if p is None:
            continue
        mem = (p.peak_mb / m.peak_mb) if (p.peak_mb is not None and m.peak_mb) else None
        rows.append({"op": m.op, "config": m.config, "mode": m.mode, "baseline": m.impl,
                     "speedup": m.median_ms / p.median_ms, "memory_ratio": mem})
    return rows


def markdown_table(results: list[Measurement], primary: str = "prefcore") -> str:
    keyed = {(m.op, m.config, m.mode, m.impl): m for m in results}
    lines = ["| op | config | mode | impl | median ms (p20–p80) | peak extra MiB | prefcore speed-up |",
             "|---|---|---|---|---|---|---|"]
    for m in results:
        p = keyed.get((m.op, m.config, m.mode, primary))
        speed = "—" if (p is None or m.impl == primary) else f"{m.median_ms / p.median_ms:.1f}×"
        peak = "n/a" if m.peak_mb is None else f"{m.peak_mb:.1f}"
        lines.append(f"| {m.op} | {m.config} | {m.mode} | {m.impl} | {m.median_ms:.2f} ({m.p20_ms:.2f}–{m.p80_ms:.2f}) "
                     f"| {peak} | {speed} |")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    import prefcore

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "prefcore_cpu_isa": prefcore._C.cpu_isa(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(info: dict) -> str:
    base = info.get("gpu") or f"cpu-{info['cpu']}-{info['torch_threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def main(argv: Sequence[str] | None = None) -> int:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()) and sys.platform.startswith("linux"):
        # Re-exec once so glibc's allocator settings apply from process start (see module doc).
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    from bench.cases import all_cases

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--out", help="JSON path (default bench/results/<machine>-<date>.json)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [c for c in all_cases() if not args.op or c.op in args.op]
    if not cases:
        parser.error(f"no benchmark case matches --op {args.op}")
    info = machine_info(device)
    print(f"# prefcore bench on {info.get('gpu', info['cpu'])}, {args.threads} threads, torch {info['torch']}, "
          f"isa {info['prefcore_cpu_isa']}")
    results: list[Measurement] = []
    for case in cases:
        results.extend(run_case(case, device, use_compile=not args.no_compile))
    table = markdown_table(results)
    print()
    print(table)
    if not args.no_save:
        date = _dt.date.today().isoformat()
        path = args.out or os.path.join(RESULTS_DIR, f"{machine_slug(info)}-{date}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"machine": info, "date": date, "results": [asdict(m) for m in results],
                       "ratios": ratios(results)}, f, indent=1)
        print(f"\nwrote {path}")
    return 0
