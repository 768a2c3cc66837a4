"""Test helpers: devices, dtypes with tolerances, and the low-precision tolerance rule."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ISAS = ("default", "avx2", "avx512")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Absolute slack added to the low-precision rule below (covers output rounding to the dtype).
LOWP_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_within_lowp_rule(out: torch.Tensor, ref_same_dtype: torch.Tensor, truth: torch.Tensor,
                            dtype: torch.dtype, factor: float = 2.0) -> None:
    """flash-attention's rule: our error against an fp64 truth is at most ``factor`` times the
    error plain PyTorch makes in the same dtype, plus a dtype-sized absolute slack."""
    err = max_abs_err(out, truth)
    base = max_abs_err(ref_same_dtype, truth)
    bound = factor * base + LOWP_ATOL[dtype] * max(1.0, truth.double().abs().max().item() if truth.numel() else 1.0)
    assert err <= bound, f"error {err:.3g} > {factor}×reference error {base:.3g} + slack (bound {bound:.3g}) in {dtype}"


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous layout (a strided view of a wider tensor)."""
    if x.dim() == 0:
        return x
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out = wide[..., ::2]
    if x.shape[-1] > 1:
        assert not out.is_contiguous()
    return out.requires_grad_(x.requires_grad) if x.is_leaf and x.requires_grad else out


def run_in_every_cpu_isa(script: str) -> list[str]:
    """Runs ``script`` (Python source that ends by printing ``prefcore._C.cpu_isa()``) in a fresh
    process once per ``PREFCORE_CPU_ISA`` value, so every CPU clone — each with its own SIMD
    width — runs it. Asserts each run succeeds and names a known ISA; returns the ISAs that ran
    (a request is capped at what the CPU supports)."""
    seen = []
    for isa in CPU_ISAS:
        env = dict(os.environ, PREFCORE_CPU_ISA=isa, PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"PREFCORE_CPU_ISA={isa}: {proc.stderr}"
        seen.append(proc.stdout.strip())
        assert seen[-1] in CPU_ISAS, seen[-1]
    return seen
