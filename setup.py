"""Build the native extension ``prefcore._C``.

CPU kernels are always built. CUDA kernels are added when torch was built with CUDA and
nvcc is found (``PREFCORE_CUDA=0/1`` forces either way). See DESIGN §2.
"""
from __future__ import annotations

import glob
import os
import sys

import torch
from packaging.version import Version
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = Version("2.4")
# The CUDA kernels need at::mm / at::addmm with a float32 out_dtype for bf16/fp16 operands
# (csrc/cuda/token_logprobs.cu), which torch has only from 2.8.
MIN_TORCH_CUDA = Version("2.8")


def _want_cuda() -> bool:
    forced = os.environ.get("PREFCORE_CUDA")
    if forced is not None:
        return forced.strip() == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _openmp_flags() -> list[str]:
    """OpenMP for GCC/Clang on Linux (torch's own CPU builds use it); none elsewhere."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _extension():
    found = Version(torch.__version__.split("+")[0])
    if found < MIN_TORCH:
        raise RuntimeError(f"prefcore needs torch>={MIN_TORCH}, found {torch.__version__}")
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp", *rel("csrc/cpu/*.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -O3 lets the ISA-dispatched inner loops (csrc/cpu/isa.h) auto-vectorise. -fopenmp: at::parallel_for
    # is header code that only runs in parallel when the extension itself is compiled with OpenMP.
    # -g0 overrides the -g that Python's own CFLAGS add: debug info of torch's headers made a fresh
    # build 2m27 instead of 1m44 on 2 cores (and the .so several times larger) for nothing a user runs.
    cxx = ["-O3", "-g0", "-fno-math-errno", "-Wno-psabi", *_openmp_flags()]
    link = _openmp_flags()
    if _want_cuda():
        if found < MIN_TORCH_CUDA:
            raise RuntimeError(
                f"prefcore's CUDA build needs torch>={MIN_TORCH_CUDA} (mm/addmm with a float32 out_dtype), found "
                f"{torch.__version__}; upgrade torch, or build the CPU kernels only with PREFCORE_CUDA=0")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return CUDAExtension(
            "prefcore._C",
            sources + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("PREFCORE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    return CppExtension("prefcore._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
