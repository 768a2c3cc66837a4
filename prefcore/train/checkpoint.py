"""Atomic file writes: training never loses a checkpoint.

Every file is written to a temporary file in the destination's directory, flushed and fsynced,
then renamed over the destination (``os.replace`` is atomic on POSIX), so a crash leaves either
the old file or the new one, never a truncated one.
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch


def _atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path``, atomically."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    atomic_write_bytes(text.encode("utf-8"), path)
