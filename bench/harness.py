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

**Warm-up.** A row is timed only after its warm-up calls: until a call's minor page faults stop
falling (first touches of fresh pages excluded), at least ``WARMUP_MIN_CALLS`` calls and 0.5 s,
past ``WARMUP_MAX_CALLS`` calls the time alone; the count is recorded per row.

**Limits.** Each process first measures the machine's limits as it sees them
(:func:`measure_limits`: the fp32 and bf16 ``torch.mm`` rate and the copy bandwidth); a case's
:class:`Bound` says which one its rows are judged against ("% of limit").

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
import resource
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
# Warm-up calls before timing (``measure``): at least 3 — the first call faults in its outputs'
# and scratch pages, the second can still grow the heap — and, once 0.5 s have passed, no more
# than 20 waiting for the faults to settle.
WARMUP_MIN_CALLS, WARMUP_MAX_CALLS = 3, 20


@dataclass(frozen=True)
class Bound:
    """What a case's speed is judged against ("% of limit" in the table).

    ``kind="gemm"``: compute-bound; ``flops(args, kwargs, mode)`` counts the nominal flops of one
    call, judged against the ``torch.mm`` rate of the inputs' dtype (first tensor argument)
    measured in the same process. ``kind="copy"``: memory-bound; the compulsory bytes of one call
    are counted from the tensors themselves — every tensor argument read once and the first
    output written once, plus in ``fwd+bwd`` every gradient of a leaf written once — and judged
    against the copy bandwidth measured in the same process."""

    kind: str  # "gemm" | "copy"
    flops: Callable[[tuple, dict, str], float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("gemm", "copy"):
            raise ValueError(f"Bound.kind must be 'gemm' or 'copy', got {self.kind!r}")
        if (self.kind == "gemm") != (self.flops is not None):
            raise ValueError("Bound: a 'gemm' bound needs flops(args, kwargs, mode); a 'copy' bound takes none")


COPY = Bound("copy")


@dataclass(frozen=True)
class BenchCase:
    """One op at one size. ``make_inputs(device) -> (args, kwargs)``; tensors that need
    gradients come back with ``requires_grad=True``. ``impls`` maps a name to a callable taking
    ``(*args, **kwargs)``; names in ``compile`` are also timed under ``torch.compile`` as
    ``"<name>+compile"``. ``primary`` is the implementation the ratios are computed for.
    ``smoke_inputs`` is ``make_inputs`` at tiny sizes, for the smoke run of
    ``bench/test_bench.py`` in ``make test`` (every case must give one). ``bound``: what limits
    the op (:class:`Bound`); None leaves the "% of limit" column empty."""

    op: str
    config: str
    make_inputs: Callable[[torch.device], tuple[tuple, dict]]
    impls: dict[str, Callable[..., Any]]
    compile: tuple[str, ...] = ("reference",)
    backward: bool = True
    primary: str = "prefcore"
    smoke_inputs: Callable[[torch.device], tuple[tuple, dict]] | None = None
    bound: Bound | None = None

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
    warmup_calls: int | None = None  # untimed calls before the timed ones (None: older files)
    minflt_per_call: float | None = None  # median minor page faults of a timed call
    bound: str | None = None  # "gemm_fp32" | "gemm_bf16" | "copy" | None: which limit applies
    work: float | None = None  # flops (gemm) or compulsory bytes (copy) of one call


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


def _minflt() -> int:
    """Minor page faults of this process so far (first touches of fresh pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Timing:
    times_ms: list[float]
    peak_mb: float | None
    warmup_calls: int
    minflt_per_call: float  # median over the timed calls


def measure(fn: Callable, args: Sequence, kwargs: dict, mode: str, device: torch.device, *,
            min_warmup: int = WARMUP_MIN_CALLS, max_warmup: int = WARMUP_MAX_CALLS, warmup_s: float = 0.5,
            min_reps: int = 5, max_reps: int = 50, budget_s: float = 1.0, peak: bool = True) -> Timing:
    leaves = _leaves(args, kwargs)
    run = lambda: _call(fn, args, kwargs, mode, leaves)  # noqa: E731
    # Warm-up: compilation, lazy initialisation and the allocator's first growth belong to no
    # steady-state call. The first calls also fault in fresh pages (the kernel zeroes each one);
    # a steady-state call reuses them. So warm up until the minor-fault count of a call stops
    # falling (no new minimum), for at least `min_warmup` calls and `warmup_s`; past
    # `max_warmup` calls (a call that faults less every time) the time alone decides.
    start = time.perf_counter()
    faults: list[int] = []
    last = 0.0
    while True:
        f0, t0 = _minflt(), time.perf_counter()
        run()
        _sync(device)
        last = time.perf_counter() - t0
        faults.append(_minflt() - f0)
        settled = len(faults) >= 2 and faults[-1] >= min(faults[:-1])
        # A call slower than the whole budget: 2 calls suffice once the faults settle.
        slow = last > budget_s
        enough = len(faults) >= (2 if slow else min_warmup) and (slow or time.perf_counter() - start >= warmup_s)
        if enough and (settled or len(faults) >= max_warmup):
            break
    # A call slower than the whole budget (a Qwen-size LM head on 2 cores takes tens of seconds):
    # 3 timed calls, so a full run stays within minutes; p20–p80 then spans those three.
    if last > budget_s:
        min_reps = min(min_reps, 3)
    times: list[float] = []
    timed_faults: list[int] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        f0, t0 = _minflt(), time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        timed_faults.append(_minflt() - f0)
    # After the timings: the profiler must not perturb the allocator state they see.
    peak_mb = _peak_extra_mb(lambda: (run(), _sync(device)), device) if peak else None
    return Timing(times, peak_mb, len(faults), statistics.median(timed_faults))


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def case_work(case: BenchCase, args: Sequence, kwargs: dict, mode: str) -> dict[str, Any]:
    """``{"bound": ..., "work": ...}`` of one call of ``case`` in ``mode`` (:class:`Bound`)."""
    bound = case.bound
    if bound is None:
        return {}
    if bound.kind == "gemm":
        dtype = next(a for a in args if isinstance(a, torch.Tensor)).dtype
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"bench case {case.name}: no GEMM rate is measured for {dtype}")
        return {"bound": f"gemm_{_DTYPE_NAMES[dtype]}", "work": float(bound.flops(tuple(args), kwargs, mode))}
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    with torch.no_grad():
        first = _first_tensor(case.impls[case.primary](*args, **kwargs))
    nbytes += first.numel() * first.element_size()
    if mode == "fwd+bwd":
        nbytes += sum(t.numel() * t.element_size() for t in _leaves(args, kwargs))
    return {"bound": "copy", "work": float(nbytes)}


# ---- the machine's limits, measured in the benchmark's own process -------------------------

# torch.mm at a fixed square shape (fp32: 17 GFLOP, ~50 ms on 2 threads at 330 GFLOP/s) and the
# copy of a tensor far larger than any last-level cache. A dtype without a fast path on the
# machine (bf16 without AVX512-BF16/AMX runs ~1 GFLOP/s: a 2048² product would take a minute)
# is measured at the largest of 256, 512, 1024, 2048 whose single call stays under
# LIMIT_GROW_S; the size used is recorded.
LIMIT_GEMM_SIZE = 2048
LIMIT_GROW_S = 0.1
LIMIT_COPY_BYTES = 256 * 2**20


def _median_ms(run: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median wall time of ``reps`` calls after one warm-up call, in ms."""
    run()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_limits(device: torch.device, *, smoke: bool = False, reps: int = 3) -> dict[str, Any]:
    """The machine's limits as this process sees them (its threads, its allocator): the
    ``torch.mm`` rate in fp32 and bf16 (GFLOP/s, ``2·n³`` flops for an n×n product, n =
    ``LIMIT_GEMM_SIZE`` unless the dtype is too slow, see above) and the copy bandwidth (GB/s,
    ``dst.copy_(src)`` counted as bytes read + bytes written). ``smoke`` uses tiny sizes (a
    check that it runs, not a measurement)."""
    nbytes = 2**20 if smoke else LIMIT_COPY_BYTES
    out: dict[str, Any] = {"copy_bytes": nbytes, "reps": reps}
    g = torch.Generator().manual_seed(0)
    for dtype, name in _DTYPE_NAMES.items():
        n = 64 if smoke else 256
        while True:
            a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)
            t0 = time.perf_counter()
            torch.mm(a, a, out=c)
            _sync(device)
            if smoke or n >= LIMIT_GEMM_SIZE or time.perf_counter() - t0 > LIMIT_GROW_S:
                break
            n *= 2
        ms = _median_ms(lambda: torch.mm(a, a, out=c), reps, device)
        out[f"gemm_{name}_gflops"] = 2 * n**3 / (ms * 1e-3) / 1e9
        out[f"gemm_{name}_size"] = n
        del a, c
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps, device)
    out["copy_gbps"] = 2 * nbytes / (ms * 1e-3) / 1e9
    return out


def limit_fraction(m: Measurement, limits: dict[str, Any] | None) -> float | None:
    """Achieved rate of ``m`` over its limit (flops/s over the GEMM rate, compulsory bytes/s over
    the copy bandwidth); None without a bound or without limits (older files)."""
    if m.bound is None or m.work is None or not limits:
        return None
    key = "copy_gbps" if m.bound == "copy" else f"{m.bound}_gflops"
    if key not in limits:
        return None
    return (m.work / (m.median_ms * 1e-3) / 1e9) / limits[key]


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
    # Smoke sizes measure nothing: no bound is attached to them.
    bounds = {} if smoke or case.bound is None else {
        mode: case_work(case, args, kwargs, mode) for mode in modes}
    out: list[Measurement] = []
    for mode in modes:
        if mode == "fwd+bwd" and not case.backward:
            continue
        for name, fn in impls.items():
            tm = measure(fn, args, kwargs, mode, device, budget_s=budget_s, warmup_s=warmup_s)
            times, peak = tm.times_ms, tm.peak_mb
            m = Measurement(case.op, case.config, mode, name, statistics.median(times),
                            _quantile(times, 0.2), _quantile(times, 0.8), len(times), peak, regime,
                            threads=threads, process=process, warmup_calls=tm.warmup_calls,
                            minflt_per_call=tm.minflt_per_call, **bounds.get(mode, {}))
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
    limit_fractions: list[float] = field(default_factory=list)  # rate over its limit, per process
    bound: str | None = None


def _limits_index(limits: Sequence[dict] | None) -> dict[tuple, dict]:
    """Per-process limits (as stored in the JSON) keyed by (threads, process)."""
    return {(lim.get("threads"), lim.get("process")): lim for lim in limits or ()}


def summarize(results: list[Measurement], primary: str = "prefcore",
              limits: Sequence[dict] | None = None) -> list[Summary]:
    groups: dict[tuple, list[Measurement]] = {}
    for m in results:
        groups.setdefault((*_group_key(m), m.impl), []).append(m)
    speed: dict[tuple, list[float]] = {}
    for r in ratios(results, primary):
        speed.setdefault((r["regime"], r["threads"], r["op"], r["config"], r["mode"], r["baseline"]),
                         []).append(r["speedup"])
    lim = _limits_index(limits)
    out = []
    for key, ms in groups.items():
        ms = sorted(ms, key=lambda m: m.process)
        peaks = [m.peak_mb for m in ms if m.peak_mb is not None]
        # Each process's rate over the limits measured in that same process.
        fracs = [f for m in ms if (f := limit_fraction(m, lim.get((m.threads, m.process)))) is not None]
        out.append(Summary(*key, statistics.median(m.median_ms for m in ms), min(m.p20_ms for m in ms),
                           max(m.p80_ms for m in ms), [m.median_ms for m in ms], speed.get(key, []),
                           statistics.median(peaks) if peaks else None, fracs, ms[0].bound))
    return out


_BOUND_LABEL = {"gemm_fp32": "fp32 GEMM", "gemm_bf16": "bf16 GEMM", "copy": "copy"}


def limit_cell(s: Summary) -> str:
    """``41–45% bf16 GEMM`` (range over processes); "—" without a bound or measured limits."""
    if not s.limit_fractions:
        return "—"
    pct = [100 * f for f in s.limit_fractions]
    return _span(pct, ".1f" if max(pct) < 10 else ".0f", "%") + f" {_BOUND_LABEL.get(s.bound, s.bound)}"


def _span(xs: list[float], fmt: str, unit: str = "") -> str:
    lo, hi = min(xs), max(xs)
    a, b = format(lo, fmt), format(hi, fmt)
    return f"{a}{unit}" if a == b else f"{a}–{b}{unit}"


def markdown_table(results: list[Measurement], primary: str = "prefcore", limits: Sequence[dict] | None = None) -> str:
    """One row per (regime, threads, op, config, mode, impl): the median over processes of
    the per-process medians with the widest p20–p80, the range of per-process medians, the
    range over processes of prefcore's speed-up (each a ratio within one process), peak
    extra tensor memory, and the range over processes of the rate over its limit (:class:`Bound`,
    each against the limits measured in that process)."""
    head = ["op", "config", "mode", "impl", "threads", "median ms (p20–p80)", "process medians ms",
            "prefcore speed-up", "peak extra MiB", "% of limit"]
    regimes = list(dict.fromkeys(m.regime for m in results))
    if regimes != [HEADLINE]:
        head.insert(4, "regime")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summarize(results, primary, limits):
        cells = [s.op, s.config, s.mode, s.impl]
        if regimes != [HEADLINE]:
            cells.append(s.regime)
        cells += [str(s.threads) if s.threads is not None else "—",
                  f"{s.median_ms:.2f} ({s.p20_ms:.2f}–{s.p80_ms:.2f})",
                  _span(s.process_medians, ".2f") + f" ({len(s.process_medians)} proc.)",
                  "—" if s.impl == primary else (_span(s.speedups, ".1f", "×") if s.speedups else "n/a"),
                  "n/a" if s.peak_mb is None else f"{s.peak_mb:.1f}", limit_cell(s)]
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
               regime: str) -> tuple[list[Measurement], dict]:
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
            data = json.load(f)
        return [Measurement(**m) for m in data["results"]], data["limits"]


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
        # The limits first, in this process at its thread count (before the cases fill the heap).
        limits = {"threads": threads[0], "process": args.child_process,
                  **measure_limits(device, smoke=args.smoke)}
        print(f"  [limits {threads[0]}t p{args.child_process}] GEMM fp32 {limits['gemm_fp32_gflops']:.0f} GFLOP/s, "
              f"bf16 {limits['gemm_bf16_gflops']:.0f} GFLOP/s; copy {limits['copy_gbps']:.1f} GB/s")
        results: list[Measurement] = []
        for case in cases:
            results.extend(run_case(case, device, use_compile=not args.no_compile, regime=args.child_regime,
                                    process=args.child_process, budget_s=args.budget,
                                    warmup_s=0.0 if args.smoke else 0.5, smoke=args.smoke))
        with open(args.child_out, "w") as f:
            json.dump({"results": [asdict(m) for m in results], "limits": limits}, f)
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
    all_limits: list[dict] = []
    failed = False
    for t in threads:
        for proc in range(args.processes):
            try:
                got, lim = _run_child(child_argv, env_extra, t, proc, regime)
                results.extend(got)
                all_limits.append(lim)
            except RuntimeError as e:  # keep what the other processes measured
                print(f"error: {e}", file=sys.stderr)
                failed = True
    if not results:
        return 1
    print()
    print(markdown_table(results, limits=all_limits))
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
                   "allocator_env_added": env_extra, "limits": all_limits,
                   "warmup": {"min_calls": WARMUP_MIN_CALLS, "max_calls": WARMUP_MAX_CALLS,
                              "rule": "until a call's minor page faults stop falling"},
                   "results": [asdict(m) for m in results],
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
