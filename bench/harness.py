"""The benchmark harness every op reuses.

For each :class:`BenchCase` it times every implementation (the fused prefcore op, the eager
reference, the reference under ``torch.compile``, and any extra baselines a case names) in two
modes — ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd`` (forward, ``.sum().backward()`` of
the first output) — and records the median and the 20th/80th percentiles of the wall time of
repeated calls, and the peak extra tensor memory of one call.

**Headline: an ordinary process.** Every figure is timed in a child process started with the
environment the user has (nothing added: no ``MALLOC_*``/``THP_*`` variables), torch's default
CPU allocator, at 2 threads and at the machine's default thread count (one set when they are
equal), and in at least two separate processes per thread count. Speed-ups are ratios of medians
taken within one process; the table shows their range over processes, and the spread of each
implementation's per-process medians.

**Diagnostic only: ``--regime warm|cold``** times the same cases under fixed glibc settings
(``warm``: buffers up to 32 MiB reused from the heap; ``cold``: every allocation above 128 KiB a
fresh ``mmap``), to tell allocator effects from an op's own work. No user process runs like
that; such results are labelled with the regime and never feed the headline table.

Peak memory is the peak of live torch tensor bytes during one call (``torch.profiler`` memory
events) over those before it — independent of how glibc reuses pages; kernel-internal scratch
outside the torch allocator (small per-thread rows here) is not counted. On CUDA it is
``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the call.

Results print as a markdown table and are written with the machine description (CPU, threads,
torch version, date, environment allocator variables) to
``bench/results/<machine>-<date>.json``; ``tools/bench_table.py`` renders the README table from
those files.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADLINE = "ordinary"
# glibc settings of the diagnostic regimes (module doc). 32 MiB is the most glibc's adaptive
# mmap threshold climbs to; the trim threshold is far above any heap these cases build.
REGIMES: dict[str, dict[str, str]] = {
    "warm": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)},
    "cold": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
}
# Environment variables that change how memory or threads behave; recorded, never set by us.
_ENV_PREFIXES = ("MALLOC_", "THP_", "LD_PRELOAD", "OMP_", "MKL_", "GOMP_", "KMP_", "PYTORCH_", "PREFCORE_")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class BenchCase:
    """One op at one size. ``make_inputs(device) -> (args, kwargs)``; tensors that need
    gradients come back with ``requires_grad=True``. ``impls`` maps a name to a callable taking
    ``(*args, **kwargs)``; names in ``compile`` are also timed under ``torch.compile`` as
    ``"<name>+compile"``. ``primary`` is the implementation the ratios are computed for.
    ``smoke_inputs`` is ``make_inputs`` at tiny sizes, for the smoke run of
    ``bench/test_bench.py`` in ``make test`` (every case must give one)."""

    op: str
    config: str
    make_inputs: Callable[[torch.device], tuple[tuple, dict]]
    impls: dict[str, Callable[..., Any]]
    compile: tuple[str, ...] = ("reference",)
    backward: bool = True
    primary: str = "prefcore"
    smoke_inputs: Callable[[torch.device], tuple[tuple, dict]] | None = None

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
    regime: str = HEADLINE  # "ordinary" (headline), a diagnostic glibc regime, or "cuda"
    extra: dict = field(default_factory=dict)
    threads: int | None = None
    process: int = 0  # index of the process it was timed in (ratios only within one)


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


def _peak_extra_mb(run: Callable[[], None], device: torch.device) -> float | None:
    """Peak live tensor bytes during ``run()`` above those live before it, in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # private API; without it there is no allocator-independent measure
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # Every allocation (+bytes) and free (−bytes) of the torch allocator, in time order; the
    # running sum's maximum is the peak (torch's own memory timeline reads the same tree).
    deltas: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            deltas.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = 0
    for _, delta in sorted(deltas):
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def measure(fn: Callable, args: Sequence, kwargs: dict, mode: str, device: torch.device, *,
            warmup: int = 2, warmup_s: float = 0.5, min_reps: int = 5, max_reps: int = 50,
            budget_s: float = 1.0, peak: bool = True) -> tuple[list[float], float | None]:
    leaves = _leaves(args, kwargs)
    run = lambda: _call(fn, args, kwargs, mode, leaves)  # noqa: E731
    # Warm up for at least `warmup` calls and `warmup_s`: compilation, lazy initialisation and
    # the allocator's first growth belong to no steady-state call.
    start = time.perf_counter()
    calls = 0
    last = 0.0
    while calls < warmup or time.perf_counter() - start < warmup_s:
        t0 = time.perf_counter()
        run()
        _sync(device)
        last = time.perf_counter() - t0
        calls += 1
    # A call slower than the whole budget (a Qwen-size LM head on 2 cores takes tens of seconds):
    # 3 timed calls, so a full run stays within minutes; p20–p80 then spans those three.
    if last > budget_s:
        min_reps = min(min_reps, 3)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    # After the timings: the profiler must not perturb the allocator state they see.
    peak_mb = _peak_extra_mb(lambda: (run(), _sync(device)), device) if peak else None
    return times, peak_mb


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_case(case: BenchCase, device: torch.device, *, use_compile: bool = True,
             modes: Sequence[str] = MODES, regime: str = HEADLINE, process: int = 0,
             budget_s: float = 1.0, warmup_s: float = 0.5, smoke: bool = False,
             log: Callable[[str], None] = print) -> list[Measurement]:
    """Time every implementation of ``case`` in this process. ``smoke`` uses the case's tiny
    ``smoke_inputs`` (a check that the code runs, not a measurement)."""
    if smoke and case.smoke_inputs is None:
        raise ValueError(f"bench case {case.name} declares no smoke_inputs")
    args, kwargs = (case.smoke_inputs if smoke else case.make_inputs)(device)
    impls: dict[str, Callable] = dict(case.impls)
    if use_compile:
        for name in case.compile:
            impls[f"{name}+compile"] = torch.compile(case.impls[name], dynamic=False)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    out: list[Measurement] = []
    for mode in modes:
        if mode == "fwd+bwd" and not case.backward:
            continue
        for name, fn in impls.items():
            times, peak = measure(fn, args, kwargs, mode, device, budget_s=budget_s, warmup_s=warmup_s)
            m = Measurement(case.op, case.config, mode, name, statistics.median(times),
                            _quantile(times, 0.2), _quantile(times, 0.8), len(times), peak, regime,
                            threads=threads, process=process)
            log(f"  [{regime} {threads}t p{process}] {case.name:<44} {mode:<8} {name:<22} "
                f"{m.median_ms:9.3f} ms ({m.p20_ms:.3f}–{m.p80_ms:.3f})"
                + (f"  peak +{peak:7.1f} MiB" if peak is not None else ""))
            out.append(m)
    return out


# ---- reporting ------------------------------------------------------------------------------

def _group_key(m: Measurement) -> tuple:
    return (m.regime, m.threads, m.op, m.config, m.mode)


def ratios(results: list[Measurement], primary: str = "prefcore") -> list[dict]:
    """Speed-up of ``primary`` against every other implementation, one row per process (both
    medians from the same process), and its peak-memory ratio where both were measured."""
    keyed = {(*_group_key(m), m.process, m.impl): m for m in results}
    rows = []
    for m in results:
        if m.impl == primary:
            continue
        p = keyed.get((*_group_key(m), m.process, primary))
        if p is None:
            continue
        mem = (p.peak_mb / m.peak_mb) if (p.peak_mb is not None and m.peak_mb) else None
        rows.append({"regime": m.regime, "threads": m.threads, "process": m.process, "op": m.op,
                     "config": m.config, "mode": m.mode, "baseline": m.impl,
                     "speedup": m.median_ms / p.median_ms, "memory_ratio": mem})
    return rows


@dataclass
class Summary:
    """One (regime, threads, op, config, mode, impl) over its processes."""

    regime: str
    threads: int | None
    op: str
    config: str
    mode: str
    impl: str
    median_ms: float          # median of the per-process medians
    p20_ms: float             # lowest per-process p20
    p80_ms: float             # highest per-process p80
    process_medians: list[float]
    speedups: list[float]     # primary's speed-up in each process ([] for primary itself)
    peak_mb: float | None


def summarize(results: list[Measurement], primary: str = "prefcore") -> list[Summary]:
    groups: dict[tuple, list[Measurement]] = {}
    for m in results:
        groups.setdefault((*_group_key(m), m.impl), []).append(m)
    speed: dict[tuple, list[float]] = {}
    for r in ratios(results, primary):
        speed.setdefault((r["regime"], r["threads"], r["op"], r["config"], r["mode"], r["baseline"]),
                         []).append(r["speedup"])
    out = []
    for key, ms in groups.items():
        ms = sorted(ms, key=lambda m: m.process)
        peaks = [m.peak_mb for m in ms if m.peak_mb is not None]
        out.append(Summary(*key, statistics.median(m.median_ms for m in ms), min(m.p20_ms for m in ms),
                           max(m.p80_ms for m in ms), [m.median_ms for m in ms], speed.get(key, []),
                           statistics.median(peaks) if peaks else None))
    return out


def _span(xs: list[float], fmt: str, unit: str = "") -> str:
    lo, hi = min(xs), max(xs)
    a, b = format(lo, fmt), format(hi, fmt)
    return f"{a}{unit}" if a == b else f"{a}–{b}{unit}"


def markdown_table(results: list[Measurement], primary: str = "prefcore") -> str:
    """One row per (regime, threads, op, config, mode, impl): the median over processes of
    the per-process medians with the widest p20–p80, the range of per-process medians, the
    range over processes of prefcore's speed-up (each a ratio within one process), and peak
    extra tensor memory."""
    head = ["op", "config", "mode", "impl", "threads", "median ms (p20–p80)", "process medians ms",
            "prefcore speed-up", "peak extra MiB"]
    regimes = list(dict.fromkeys(m.regime for m in results))
    if regimes != [HEADLINE]:
        head.insert(4, "regime")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summarize(results, primary):
        cells = [s.op, s.config, s.mode, s.impl]
        if regimes != [HEADLINE]:
            cells.append(s.regime)
        cells += [str(s.threads) if s.threads is not None else "—",
                  f"{s.median_ms:.2f} ({s.p20_ms:.2f}–{s.p80_ms:.2f})",
                  _span(s.process_medians, ".2f") + f" ({len(s.process_medians)} proc.)",
                  "—" if s.impl == primary else (_span(s.speedups, ".1f", "×") if s.speedups else "n/a"),
                  "n/a" if s.peak_mb is None else f"{s.peak_mb:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(device: torch.device, default_threads: int | None = None) -> dict:
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
        "cpu": cpu, "logical_cores": os.cpu_count(),
        "torch_default_threads": default_threads if default_threads is not None else torch.get_num_threads(),
        "prefcore_cpu_isa": prefcore._C.cpu_isa(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
        "environment": {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)},
    }
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            info["transparent_hugepage"] = f.read().strip()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(info: dict, threads: Sequence[int]) -> str:
    base = info.get("gpu") or f"cpu-{info['cpu']}-{'-'.join(str(t) for t in threads)}t"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def _run_child(argv: list[str], env_extra: dict[str, str], threads: int, process: int,
               regime: str) -> list[Measurement]:
    """Time the cases in a fresh child process (the user's environment plus ``env_extra``,
    which is empty for the headline)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        cmd = [sys.executable, "-m", "bench", *argv, "--threads", str(threads), "--_child-out", path,
               "--_child-process", str(process), "--_child-regime", regime]
        if subprocess.run(cmd, env={**os.environ, **env_extra}).returncode != 0:
            raise RuntimeError(f"benchmark process {process} ({regime}, {threads} threads) failed "
                               "(its output is above)")
        with open(path) as f:
            return [Measurement(**m) for m in json.load(f)]


def main(argv: Sequence[str] | None = None) -> int:
    from bench.cases import all_cases

    default_threads = torch.get_num_threads()  # before anything sets it: the machine's default
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, action="append",
                        help="torch CPU threads (repeatable; default: 2 and the machine's default, "
                             f"here {default_threads})")
    parser.add_argument("--processes", type=int, default=2,
                        help="separate processes per thread count (default 2, at least 1)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timed calls per implementation and mode (default 1.0; at least "
                             "5 calls)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny inputs and budgets: checks the harness runs, measures nothing")
    parser.add_argument("--regime", choices=tuple(REGIMES),
                        help="DIAGNOSTIC: time under a fixed glibc setting instead of the ordinary "
                             "process (module doc); never the headline")
    parser.add_argument("--preliminary", action="store_true",
                        help="label the JSON preliminary (e.g. timed on a shared, loaded machine)")
    parser.add_argument("--out", help="JSON path (default bench/results/<machine>-<date>.json)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--_child-out", dest="child_out", help=argparse.SUPPRESS)
    parser.add_argument("--_child-process", dest="child_process", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_child-regime", dest="child_regime", default=HEADLINE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if device.type == "cuda" and args.regime is not None:
        parser.error("--regime applies to CPU runs (CUDA has one regime: its caching allocator)")
    if args.regime is not None and platform.libc_ver()[0] != "glibc":
        parser.error("--regime sets glibc variables; this Python does not run on glibc")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    threads = list(dict.fromkeys(args.threads or [2, default_threads]))
    if any(t < 1 for t in threads):
        parser.error(f"--threads must be >= 1, got {threads}")
    if args.smoke and not args.no_save and args.out is None and args.child_out is None:
        parser.error("--smoke results are not measurements: pass --no-save or an explicit --out")
    cases = [c for c in all_cases() if not args.op or c.op in args.op]
    if not cases:
        parser.error(f"no benchmark case matches --op {args.op}")

    if args.child_out is not None:  # a child: time, hand the measurements back
        torch.set_num_threads(threads[0])
        results: list[Measurement] = []
        for case in cases:
            results.extend(run_case(case, device, use_compile=not args.no_compile, regime=args.child_regime,
                                    process=args.child_process, budget_s=args.budget,
                                    warmup_s=0.0 if args.smoke else 0.5, smoke=args.smoke))
        with open(args.child_out, "w") as f:
            json.dump([asdict(m) for m in results], f)
        return 0

    info = machine_info(device, default_threads)
    regime = "cuda" if device.type == "cuda" else (args.regime or HEADLINE)
    if device.type == "cuda":
        threads = threads[:1]
    env_extra = REGIMES.get(args.regime or "", {})
    same = "" if len(threads) > 1 else f" (the machine's default is {default_threads}: one set)"
    print(f"# prefcore bench on {info.get('gpu', info['cpu'])}, torch {info['torch']}, isa "
          f"{info['prefcore_cpu_isa']}; {regime} process"
          + ("" if regime == HEADLINE else " (DIAGNOSTIC: not the headline)")
          + f", threads {threads}{same}, {args.processes} processes each")
    child_argv = _strip_option(argv, ("--out", "--regime", "--threads", "--processes"), ("--no-save", "--preliminary"))
    results = []
    failed = False
    for t in threads:
        for proc in range(args.processes):
            try:
                results.extend(_run_child(child_argv, env_extra, t, proc, regime))
            except RuntimeError as e:  # keep what the other processes measured
                print(f"error: {e}", file=sys.stderr)
                failed = True
    if not results:
        return 1
    print()
    print(markdown_table(results))
    if not args.no_save:
        now = _dt.datetime.now(_dt.timezone.utc)
        date = now.date().isoformat()
        suffix = "" if regime in (HEADLINE, "cuda") else f"-diagnostic-{regime}"
        path = args.out or os.path.join(RESULTS_DIR, f"{machine_slug(info, threads)}{suffix}-{date}.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open("/proc/loadavg") as f:
                load = f.read().split()[:3]
        except OSError:
            load = None
        payload = {"machine": info, "date": date, "datetime_utc": now.isoformat(timespec="seconds"),
                   "regime": regime, "headline": regime in (HEADLINE, "cuda") and not args.smoke,
                   "smoke": args.smoke, "preliminary": args.preliminary, "threads": threads,
                   "processes": args.processes, "budget_s": args.budget, "load_average_at_end": load,
                   "allocator_env_added": env_extra, "results": [asdict(m) for m in results],
                   "ratios": ratios(results)}
        tmp_path = path + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp_path, path)
        print(f"\nwrote {path}")
    return 1 if failed else 0


def _strip_option(argv: list[str], names: tuple[str, ...], flags: tuple[str, ...] = ()) -> list[str]:
    """``argv`` without the options ``names`` and their values (``--x v`` or ``--x=v``) and
    without the value-less ``flags``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif a in flags:
            continue
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out
