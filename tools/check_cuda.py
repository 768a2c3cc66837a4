"""Compile-check every ``csrc/cuda/*.cu`` with the machine's nvcc (``nvcc -c``, no link).

Runs against whatever torch is installed — including a CPU-only wheel, whose headers carry
``c10/cuda`` — so CI catches CUDA compile errors without a GPU (DESIGN §2). Objects are
cached under ``build/cuda-check`` keyed on the source's and headers' mtimes, so a re-run with
nothing changed is instant. Exits 0 with a note when nvcc is absent.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "cuda-check")


def _nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _newest_header_mtime() -> float:
    headers = glob.glob(os.path.join(ROOT, "csrc", "include", "**", "*.h"), recursive=True)
    headers += glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))
    headers += glob.glob(os.path.join(ROOT, "csrc", "*.h"))  # argument checks shared with the CPU
    return max((os.path.getmtime(h) for h in headers), default=0.0)


def main() -> int:
    nvcc = _nvcc()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if nvcc is None:
        print("check_cuda: nvcc not found; skipping CUDA compile-check")
        return 0
    from torch.utils.cpp_extension import include_paths

    os.makedirs(OUT, exist_ok=True)
    flags = [
        "-c", "-std=c++20", "-O2", "-gencode", "arch=compute_90,code=sm_90",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DPREFCORE_WITH_CUDA=1", "--expt-relaxed-constexpr",
        "-Xcompiler", "-fPIC", "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc"),
        "-I", sysconfig.get_paths()["include"],
    ]
    for inc in include_paths():
        flags += ["-I", inc]
    header_mtime = _newest_header_mtime()
    stale = []
    for src in sources:
        obj = os.path.join(OUT, os.path.basename(src) + ".o")
        if os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src), header_mtime):
            print(f"check_cuda: {os.path.relpath(src, ROOT)} up to date")
        else:
            stale.append((src, obj))

    def compile_one(item: tuple[str, str]) -> tuple[str, str, subprocess.CompletedProcess, float]:
        src, obj = item
        t0 = time.time()
        return src, obj, subprocess.run([nvcc, *flags, src, "-o", obj], capture_output=True, text=True), time.time() - t0

    # One nvcc per core (each translation unit is independent; CI has 2 cores): the check's wall
    # time is then bounded by the slowest file rather than the sum.
    jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for src, obj, proc, seconds in pool.map(compile_one, stale):
            status = "ok" if proc.returncode == 0 else "FAILED"
            print(f"check_cuda: {os.path.relpath(src, ROOT)} {status} ({seconds:.0f}s)", flush=True)
            if proc.returncode != 0:
                sys.stdout.write(proc.stdout + proc.stderr)
                failed.append(src)
                if os.path.exists(obj):
                    os.remove(obj)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
