"""Argument checks for model configs and head inputs (errors name the argument, expected vs got)."""
from __future__ import annotations

import math

import torch

from prefcore.ops._checks import require_floating, shape_str


def require_int(value: object, name: str, *, min_value: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


def require_positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be a finite float > 0, got {v}")
    return v


def require_features(h: object, in_features: int, name: str = "features") -> torch.Tensor:
    """``h`` must be a floating tensor of shape ``(*, in_features)``."""
    t = require_floating(h, name)
    if t.dim() < 1 or t.shape[-1] != in_features:
        raise ValueError(
            f"{name} must have shape (*, D) with D = in_features = {in_features}, got {shape_str(t.shape)}"
        )
    return t
