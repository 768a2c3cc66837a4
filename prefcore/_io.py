"""File helpers shared by every writer in prefcore (training checkpoints, model saves, the feature
cache, JSONL data): atomic writes and content hashes.

An atomic write goes to a temporary file in the destination's directory (same filesystem), is
flushed and fsynced, then ``os.replace``d onto the final name. A reader therefore sees either
the old complete file or the new complete file, never a torn one, even if the writer is killed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike[str], obj: object) -> None:
    """``torch.save(obj, path)`` atomically (a failure while pickling leaves the old file)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(path: str | os.PathLike[str], obj: object) -> None:
    """Write ``obj`` as pretty JSON (sorted keys, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` made atomic (tensors are made contiguous on the CPU)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_strings(items: Iterable[str]) -> str:
    """Hash of a sequence of strings; each is length-prefixed so ``["ab", "c"] != ["a", "bc"]``."""
    h = hashlib.sha256()
    for s in items:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and raw bytes (keys in sorted order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
