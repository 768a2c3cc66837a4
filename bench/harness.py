"""The benchmark harness every op reuses.

For each :class:`BenchCase` it times every implementation (the fused prefcore op, the eager
reference, the reference under ``torch.compile``, and any extra baselines a case names) in two
modes — ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd`` (forward, ``.sum().backward()`` of
the first output) — and records the median and the 20th/80th percentiles of wall time and the
peak extra memory of one call.

On CPU the time an op takes depends on whether its outputs and temporaries land on pages the
process already has (a page fault and the kernel zeroing the page cost as much as writing it),
which is the allocator's choice, not the op's. glibc's default decides that from the history of
the process (its mmap threshold adapts, its heap top is trimmed), so identical runs differed by
up to 4× here. The CPU harness therefore times every case under two fixed glibc settings, each
in its own process (glibc reads them at start-up):

* ``warm`` — an mmap threshold of 32 MiB and no trimming: buffers up to 32 MiB are reused from
  the heap, as in a long-running training process (glibc's adaptive threshold climbs to the
  sizes it frees, up to 32 MiB) or, for those sizes, under a caching allocator (jemalloc,
  tcmalloc). Larger buffers are fresh mmaps, as they are under glibc's default. Listed first:
  it is the steady state of a training loop, and it repeats better from run to run.
* ``cold`` — every allocation above 128 KiB is a fresh ``mmap`` and every free returns it: each
  call pays for first-touching all of its large buffers (on a VM whose balloon driver reports
  freed 2 MiB blocks to the host this also varies from run to run: once 11 ms vs 1 ms for the
  same call here). This is also where peak memory is measured: the rise of the process's peak
  RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) over its RSS before the call.

On CUDA there is one regime (PyTorch's caching allocator); peak memory is
``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the call.

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
# glibc settings of the two CPU timing regimes (module doc). 32 MiB is the most glibc's adaptive
# mmap threshold climbs to; the trim threshold is far above any heap these cases build.
REGIMES: dict[str, dict[str, str]] = {
    "warm": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)},
    "cold": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
}
MEMORY_REGIME = "cold"  # where peak memory is measured
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
    regime: str = "cold"  # CPU allocator regime (module doc), or "cuda"
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
            warmup: int = 2, min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0,
            peak: bool = True) -> tuple[list[float], float | None]:
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
    peak_mb = _peak_extra_mb(lambda: (run(), _sync(device)), device) if peak else None
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, peak_mb


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_case(case: BenchCase, device: torch.device, *, use_compile: bool = True,
             modes: Sequence[str] = MODES, regime: str = "cold",
             log: Callable[[str], None] = print) -> list[Measurement]:
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
            times, peak = measure(fn, args, kwargs, mode, device, peak=regime in (MEMORY_REGIME, "cuda"))
            m = Measurement(case.op, case.config, mode, name, statistics.median(times),
                            _quantile(times, 0.2), _quantile(times, 0.8), len(times), peak, regime)
            log(f"  {regime:<5} {case.name:<48} {mode:<8} {name:<22} {m.median_ms:9.3f} ms"
                + (f"  peak +{peak:8.1f} MiB" if peak is not None else ""))
            out.append(m)
    return out


# ---- reporting ------------------------------------------------------------------------------

def ratios(results: list[Measurement], primary: str = "prefcore") -> list[dict]:
    """Speed-up of ``primary`` against every other implementation in the same regime, and its
    peak-memory ratio where both were measured."""
    rows = []
    keyed = {(m.regime, m.op, m.config, m.mode, m.impl): m for m in results}
    for m in results:
        if m.impl == primary:
            continue
        p = keyed.get((m.regime, m.op, m.config, m.mode, primary))
        if p is None:
            continue
        mem = (p.peak_mb / m.peak_mb) if (p.peak_mb is not None and m.peak_mb) else None
        rows.append({"regime": m.regime, "op": m.op, "config": m.config, "mode": m.mode, "baseline": m.impl,
                     "speedup": m.median_ms / p.median_ms, "memory_ratio": mem})
    return rows


def markdown_table(results: list[Measurement], primary: str = "prefcore") -> str:
    """One row per (op, config, mode, impl); a time and speed-up column per regime, in the
    order the regimes first appear; peak memory from the regime that measured it."""
    regimes = list(dict.fromkeys(m.regime for m in results))
    keyed = {(m.regime, m.op, m.config, m.mode, m.impl): m for m in results}
    rows = list(dict.fromkeys((m.op, m.config, m.mode, m.impl) for m in results))
    head = ["op", "config", "mode", "impl"]
    for r in regimes:
        head += [f"{r}: median ms (p20–p80)", f"{r}: prefcore speed-up"]
    head.append("peak extra MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = list(row)
        peak = "n/a"
        for r in regimes:
            m, p = keyed.get((r, *row)), keyed.get((r, *row[:3], primary))
            if m is None:
                cells += ["", ""]
                continue
            cells.append(f"{m.median_ms:.2f} ({m.p20_ms:.2f}–{m.p80_ms:.2f})")
            speed = "n/a" if p is None else f"{m.median_ms / p.median_ms:.1f}×"
            cells.append("—" if m.impl == primary else speed)
            if m.peak_mb is not None:
                peak = f"{m.peak_mb:.1f}"
        cells.append(peak)
        lines.append("| " + " | ".join(cells) + " |")
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


def _run_regime(regime: str, argv: list[str]) -> list[Measurement]:
    """Run the cases in a child process started with ``regime``'s glibc settings."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        env = {**os.environ, **REGIMES[regime]}
        cmd = [sys.executable, "-m", "bench", *argv, "--regime", regime, "--_child-out", path]
        if subprocess.run(cmd, env=env).returncode != 0:
            raise RuntimeError(f"the {regime} regime's benchmark process failed (its output is above)")
        with open(path) as f:
            return [Measurement(**m) for m in json.load(f)]


def main(argv: Sequence[str] | None = None) -> int:
    from bench.cases import all_cases

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--regime", choices=("both", *REGIMES), default="both",
                        help="CPU allocator regime(s) to time (module doc; default both); peak memory "
                             f"is measured in the {MEMORY_REGIME} regime only")
    parser.add_argument("--out", help="JSON path (default bench/results/<machine>-<date>.json)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--_child-out", dest="child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if device.type == "cuda" and args.regime != "both":
        parser.error("--regime applies to CPU runs (CUDA has one regime: its caching allocator)")
    cases = [c for c in all_cases() if not args.op or c.op in args.op]
    if not cases:
        parser.error(f"no benchmark case matches --op {args.op}")
    info = machine_info(device)
    results: list[Measurement] = []
    if args.child_out is not None:  # a regime's child: time, hand the measurements back
        for case in cases:
            results.extend(run_case(case, device, use_compile=not args.no_compile, regime=args.regime))
        with open(args.child_out, "w") as f:
            json.dump([asdict(m) for m in results], f)
        return 0
    print(f"# prefcore bench on {info.get('gpu', info['cpu'])}, {args.threads} threads, torch {info['torch']}, "
          f"isa {info['prefcore_cpu_isa']}")
    failed = False
    if device.type == "cuda":
        for case in cases:
            results.extend(run_case(case, device, use_compile=not args.no_compile, regime="cuda"))
    elif platform.libc_ver()[0] != "glibc":
        parser.error("the CPU allocator regimes are glibc settings; this Python does not run on glibc")
    else:
        child_argv = [a for a in argv if a not in ("--no-save",)]
        child_argv = _strip_option(child_argv, ("--out", "--regime"))
        for regime in (REGIMES if args.regime == "both" else (args.regime,)):
            try:
                results.extend(_run_regime(regime, child_argv))
            except RuntimeError as e:  # keep what the other regime measured
                print(f"error: {e}", file=sys.stderr)
                failed = True
    if not results:
        return 1
    table = markdown_table(results)
    print()
    print(table)
    if not args.no_save:
        date = _dt.date.today().isoformat()
        path = args.out or os.path.join(RESULTS_DIR, f"{machine_slug(info)}-{date}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        regimes = {r: REGIMES[r] for r in dict.fromkeys(m.regime for m in results) if r in REGIMES}
        with open(path, "w") as f:
            json.dump({"machine": info, "date": date, "allocator_regimes": regimes,
                       "results": [asdict(m) for m in results], "ratios": ratios(results)}, f, indent=1)
        print(f"\nwrote {path}")
    return 1 if failed else 0


def _strip_option(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` and their values (``--x v`` or ``--x=v``)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out
