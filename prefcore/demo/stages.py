"""Resumable stages of a multi-step run (used by ``prefcore demo``).

A stage is a named function that writes its outputs under ``OUT/<name>/`` (a name may contain
``/``: ``seed-0/rloo-mean``) and returns a small
JSON-serialisable summary. When it returns, the summary is written atomically to
``OUT/stages/<name>.json`` together with the stage's *key* (the settings it depends on). A later
run with the same ``OUT`` skips every stage whose marker exists with the same key and reuses its
summary; a stage without a marker (never started, or interrupted) has its directory cleared and is
run again from scratch. Stages are deterministic functions of their key, so a resumed run ends
with the same outputs and report as an uninterrupted one.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefcore._io import atomic_write_json

MARKERS = "stages"


@dataclass
class StageRunner:
    """Runs stages under ``out``; ``log`` receives one line per stage (``print`` by default)."""

    out: Path
    log: Callable[[str], None] = print
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def marker(self, name: str) -> Path:
        return self.out / MARKERS / f"{name}.json"

    def done(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored summary of stage ``name`` if it finished with the same ``key``, else None."""
        path = self.marker(name)
        if not path.exists():
            return None
        with open(path) as f:
            stored = json.load(f)
        return stored["result"] if stored.get("key") == _jsonable(key) else None

    def run(self, name: str, key: dict[str, Any], fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(OUT/name)`` unless stage ``name`` already finished with ``key``."""
        cached = self.done(name, key)
        if cached is not None:
            self.reused.append(name)
            self.log(f"[{name}] done earlier — reusing {self.out / name}")
            return cached
        stage_dir = self.out / name
        if stage_dir.exists():  # an interrupted attempt: start the stage again from scratch
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
        self.log(f"[{name}] running …")
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn(stage_dir)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu_start  # all threads: ~ the wall time on idle cores × threads
        atomic_write_json(self.marker(name), {"key": _jsonable(key), "result": _jsonable(result),
                                              "seconds": round(seconds, 2),
                                              "cpu_seconds": round(cpu, 2)})
        self.ran.append(name)
        self.log(f"[{name}] finished in {seconds:.1f} s")
        return _jsonable(result)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists, keys → str), so keys compare exactly."""
    return json.loads(json.dumps(obj))
