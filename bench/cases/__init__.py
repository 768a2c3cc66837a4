"""Benchmark cases, one module per op family; each module defines ``CASES: list[BenchCase]``.

Modules are discovered automatically, so adding a family is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil

from bench.harness import BenchCase


def all_cases() -> list[BenchCase]:
    cases: list[BenchCase] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases.extend(importlib.import_module(f"{__name__}.{info.name}").CASES)
    return cases
