"""``make gpu-check``: prove the CUDA path on a GPU machine in one command (issue 20).

Stages, in order, each a subprocess with its own log (``build/gpu-check/NN-<stage>.log``) and
time limit; the first failure stops the run and prints the end of its log:

1. ``versions``   — python, torch, torch's CUDA, nvcc, the device, its capability and driver;
2. ``build``      — the CUDA extension against this machine's own torch:
                    ``pip install --no-build-isolation --no-deps -e .`` with ``MAX_JOBS=16``
                    and ``PREFCORE_CUDA=1``;
3. ``cuda-fixes`` — ``pytest -m cuda -q python_tests/test_ops_cuda_fixes.py`` (issue 20's fixes);
4. ``parity``     — ``pytest -m cuda -q`` over the rest of python_tests (every CPU-vs-CUDA and
                    CUDA-vs-float64 test of the ops, losses and distributions);
5. ``policy``     — ``prefcore train-policy --device cuda --bf16 --max_steps 2`` on the embedded
                    tiny text-world model (two optimisation steps and a checkpoint);
6. ``bench``      — ``python -m bench --device cuda`` (fused vs eager vs ``torch.compile``, plus
                    ``F.linear_cross_entropy`` where this torch has it), one process, short budget.
                    Last: its ``torch.compile`` baselines are the slowest, least certain stage, and
                    a run past its limit must not hide the proofs above.

Results go to ``bench/results/gpu-<device>-<date>.json``, rewritten atomically after *every*
stage, so a later failure still leaves what ran (with the failing stage's log tail). The stages
together are sized to stay within 8 minutes on one H200 with a 16-core host (README "GPU check").

Without a CUDA device the command prints what it would run and exits 2 with one line
``gpu-check: error: ...``. ``--dry-run`` instead runs each stage's CPU-side stand-in here (the
build becomes ``tools/check_cuda.py``, the nvcc compile of every ``.cu``; the CUDA tests become
the CPU halves of the fix tests; the bench and the policy steps run at smoke size on the CPU;
the parity stage has no stand-in) and writes ``build/gpu-check/dry-run-<date>.json``: it times
what can be timed without a GPU, and proves nothing about the GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_DIR = os.path.join(ROOT, "build", "gpu-check")
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
TAIL_CHARS = 4000


def _load_io():
    """prefcore/_io.py (atomic writes) loaded by path: importing the ``prefcore`` package would
    load the native extension, which the build stage has not produced yet."""
    spec = importlib.util.spec_from_file_location("_prefcore_io", os.path.join(ROOT, "prefcore", "_io.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Stage:
    """One step of the check: ``argv`` on a GPU machine, ``dry_argv`` (or None) for --dry-run."""

    name: str
    what: str
    argv: list[str]
    dry_argv: list[str] | None
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)

    def limit(self, dry_run: bool) -> int:
        """Seconds allowed: the GPU-machine limit, or 4× it for a CPU stand-in (a 2-core CPU
        host, possibly shared, runs the stand-ins several times slower than the 16-core host)."""
        return self.timeout_s * 4 if dry_run else self.timeout_s


@dataclass
class StageResult:
    name: str
    command: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    log: str | None
    returncode: int | None = None
    tail: str | None = None


VERSIONS_SCRIPT = r"""
import json, platform, shutil, subprocess, torch
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e.__class__.__name__})"
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "nvcc": run([nvcc, "--version"]).splitlines()[-1:] ,
        "cpu_count": __import__("os").cpu_count(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
print("VERSIONS " + json.dumps(info))
"""


def stages(py: str, bench_json: str, policy_dir: str) -> list[Stage]:
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    fixes = "python_tests/test_ops_cuda_fixes.py"
    return [
        Stage("versions", "python / torch / CUDA / device versions", [py, "-c", VERSIONS_SCRIPT],
              [py, "-c", VERSIONS_SCRIPT], 60),
        Stage("build", "build the CUDA extension against this torch (16 parallel nvcc/c++ jobs)",
              [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
              [py, "tools/check_cuda.py"], 330, env={"MAX_JOBS": "16", "PREFCORE_CUDA": "1"}),
        Stage("cuda-fixes", "issue 20's fixes on the device", [*pytest, "-m", "cuda", fixes],
              [*pytest, "-m", "not cuda", fixes], 120),
        Stage("parity", "every other CUDA-marked test (CPU vs CUDA, CUDA vs float64)",
              [*pytest, "-m", "cuda", "python_tests", f"--ignore={fixes}"], None, 150),
        Stage("policy", "train-policy: 2 bf16 steps on the embedded tiny text-world model",
              [py, "-m", "prefcore.cli", "train-policy", "--device", "cuda", "--bf16", "--max_steps", "2",
               "--save_steps", "2", "--no_progress", "--output_dir", policy_dir],
              [py, "-m", "prefcore.cli", "train-policy", "--device", "cpu", "--max_steps", "1",
               "--save_steps", "1", "--no_progress", "--max_completion_length", "8", "--output_dir", policy_dir],
              150),
        Stage("bench", "op bench on the GPU: fused vs eager vs compiled (+ F.linear_cross_entropy)",
              [py, "-m", "bench", "--device", "cuda", "--processes", "1", "--budget", "0.2", "--out", bench_json],
              [py, "-m", "bench", "--device", "cpu", "--smoke", "--processes", "1", "--threads", "1",
               "--no-compile", "--out", bench_json], 210),
    ]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-TAIL_CHARS:]


def _command(st: Stage, argv: list[str]) -> str:
    """The command as printed and recorded (the versions script shown as ``<script>``)."""
    shown = argv[:2] + ["<script>"] if st.name == "versions" else argv
    return " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT + os.sep) else a for a in shown)


def _run_stage(index: int, st: Stage, argv: list[str], timeout_s: int) -> StageResult:
    log = os.path.join(LOG_DIR, f"{index:02d}-{st.name}.log")
    command = _command(st, argv)
    env = {**os.environ, **st.env}
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(f'{k}={v}' for k, v in st.env.items())} {command}\n")
        f.flush()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s)
            rc: int | None = proc.returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    seconds = round(time.monotonic() - t0, 1)
    return StageResult(st.name, command, status, seconds, os.path.relpath(log, ROOT), rc,
                       None if status == "ok" else _tail(log))


def _versions_from_log(log: str) -> dict:
    with open(os.path.join(ROOT, log)) as f:
        for line in f:
            if line.startswith("VERSIONS "):
                return json.loads(line[len("VERSIONS "):])
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: run each stage's CPU-side stand-in here and time it (proves nothing on a GPU)")
    ap.add_argument("--stages", help="comma-separated subset of stages to run (default: all)")
    ap.add_argument("--out", help="results JSON path (default bench/results/gpu-<device>-<date>.json; "
                                  "--dry-run: build/gpu-check/dry-run-<date>.json)")
    args = ap.parse_args(argv)

    py = sys.executable
    os.makedirs(LOG_DIR, exist_ok=True)
    bench_json = os.path.join(LOG_DIR, "bench.json")
    policy_dir = os.path.join(LOG_DIR, "policy-run")
    plan = stages(py, bench_json, policy_dir)
    if args.stages:
        names = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [n for n in names if n not in {s.name for s in plan}]
        if unknown or not names:
            ap.error(f"--stages: unknown stage(s) {unknown}; choose from {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in names]

    import torch  # after argument parsing: --help stays instant

    has_gpu = torch.cuda.is_available()
    print(f"gpu-check: {'dry run (CPU-side stand-ins)' if args.dry_run else 'GPU check'}; stages:")
    for i, st in enumerate(plan, 1):
        cmd = st.dry_argv if args.dry_run else st.argv
        env = "" if args.dry_run else "".join(f"{k}={v} " for k, v in st.env.items())
        shown = "(needs a GPU: skipped)" if cmd is None else env + _command(st, cmd)
        print(f"  {i}. {st.name:<10} ≤{st.limit(args.dry_run):>3}s  {st.what}\n       {shown}")
    if not args.dry_run and not has_gpu:
        print(f"gpu-check: error: no CUDA device visible to torch {torch.__version__} "
              f"(torch.cuda.is_available() is False); run it on a GPU machine, or pass --dry-run to time "
              f"the CPU-side stages here", file=sys.stderr)
        return 2

    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    if args.out:
        out = args.out
    elif args.dry_run:
        out = os.path.join(LOG_DIR, f"dry-run-{date}.json")
    else:
        out = os.path.join(RESULTS_DIR, f"gpu-{_slug(torch.cuda.get_device_name(0))}-{date}.json")
    io = _load_io()
    record: dict = {
        "tool": "tools/gpu_check.py", "dry_run": args.dry_run,
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "device": torch.cuda.get_device_name(0) if has_gpu else "cpu",
        "status": "running", "total_seconds": 0.0, "stages": [], "versions": {}, "bench": None,
    }
    io.atomic_write_json(out, record)
    # Fresh outputs: a stale bench JSON must not be reported, nor a stale run directory resumed.
    for stale in (bench_json,):
        if os.path.exists(stale):
            os.remove(stale)
    shutil.rmtree(policy_dir, ignore_errors=True)
    t_all = time.monotonic()
    status = "ok"
    for i, st in enumerate(plan, 1):
        cmd = st.dry_argv if args.dry_run else st.argv
        if cmd is None:
            res = StageResult(st.name, "(needs a GPU)", "skipped", 0.0, None)
        else:
            print(f"gpu-check: [{i}/{len(plan)}] {st.name} ...", flush=True)
            res = _run_stage(i, st, cmd, st.limit(args.dry_run))
        record["stages"].append(asdict(res))
        if st.name == "versions" and res.status == "ok":
            record["versions"] = _versions_from_log(res.log)
        if st.name == "bench" and res.status == "ok" and os.path.exists(bench_json):
            with open(bench_json) as f:
                record["bench"] = json.load(f)
        record["total_seconds"] = round(time.monotonic() - t_all, 1)
        if res.status in ("failed", "timeout"):
            status = f"{st.name} {res.status}"
        record["status"] = status if status != "ok" else ("running" if i < len(plan) else "ok")
        io.atomic_write_json(out, record)  # after every stage: a later failure keeps this
        print(f"gpu-check: [{i}/{len(plan)}] {st.name} {res.status} ({res.seconds:.1f}s)", flush=True)
        if status != "ok":
            print(f"--- last {TAIL_CHARS} characters of {res.log} ---\n{res.tail}", file=sys.stderr)
            how = (f"timed out (limit {st.limit(args.dry_run)}s)" if res.status == "timeout"
                   else f"failed (exit code {res.returncode}) after {res.seconds:.0f}s")
            print(f"gpu-check: error: stage {st.name} {how}; log {res.log}; results {out}", file=sys.stderr)
            return 1
    print(f"gpu-check: all {len(plan)} stages {'ran' if args.dry_run else 'passed'} in "
          f"{record['total_seconds']:.0f}s; results {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
