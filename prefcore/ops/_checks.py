"""Argument checks shared by the op wrappers.

Every failure raises ``ValueError`` (``TypeError`` for a non-tensor) naming the argument and
saying what was expected and what was received. Checks look at shapes, dtypes and devices
only, never at values of device tensors, so they cost nothing on the GPU and trace cleanly
under ``torch.compile``; value checks that need data live in the C++ ops.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_floating(x: object, name: str) -> torch.Tensor:
    t = require_tensor(x, name)
    if t.dtype not in FLOATING:
        raise ValueError(f"{name} must be a floating tensor (float32/float64/bfloat16/float16), got {t.dtype}")
    return t


def require_bool(x: object, name: str) -> torch.Tensor:
    t = require_tensor(x, name)
    if t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    return t


def require_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def require_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def require_finite_float(value: object, name: str, *, min_value: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if min_value is not None and v < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {v}")
    return v


def shape_str(shape: Sequence[int | str]) -> str:
    """``(4, 3)``-style text for a shape; symbolic sizes (``"N"``) are kept as written."""
    return "(" + ", ".join(s if isinstance(s, str) else str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"
