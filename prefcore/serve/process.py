"""Start ``prefcore serve-rm`` as a child process and wait until it answers — for scripts,
benchmarks and tests that need a real server on this machine.

>>> with ServerProcess(["runs/rm-qrm", "--utility", "cvar:0.1"]) as server:
...     RemoteReward(server.url)(prompts, completions)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence


class ServerProcess:
    """``python -m prefcore.cli serve-rm ARGS --port 0`` (a free port; default host 127.0.0.1).
    ``url`` is ``http://127.0.0.1:PORT`` once :meth:`start` returns; :meth:`stop` sends SIGTERM
    and returns the exit code (killed after ``timeout`` seconds). The server's output is kept in
    ``output`` (a list of lines) for error messages."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, startup_timeout: float = 120.0):
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.output: list[str] = []

    def start(self) -> ServerProcess:
        import httpx

        argv = [sys.executable, "-m", "prefcore.cli", "serve-rm", *self.args]
        if "--port" not in self.args:
            argv += ["--port", "0"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        ready = threading.Event()

        def read() -> None:  # keep draining the pipe so the server never blocks on a full one
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))
                if not self.url and " on http://" in line:
                    self.url = line.rsplit(" on ", 1)[1].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        ready.wait(self.startup_timeout)
        while time.monotonic() < deadline and self.proc.poll() is None and self.url:
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        code = self.stop()
        raise RuntimeError(f"serve-rm did not start (exit code {code}):\n" + "\n".join(self.output[-20:]))

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
