"""Run ``prefcore serve-rm``: load the model, start the batcher, serve with uvicorn until SIGTERM
or SIGINT (in-flight requests finish first, up to ``--graceful_timeout_s``), exit 0."""
from __future__ import annotations

import signal
import socket
import sys

from prefcore.serve.config import ServeConfig


def require_server_packages() -> None:
    """One clear error when the optional serving packages are missing."""
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"serve-rm needs {' and '.join(missing)}: pip install 'prefcore[serve]'")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), bound before the model loads so
    a port in use is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def serve(cfg: ServeConfig) -> None:
    """Serve ``cfg.reward_model`` until stopped (see the module docstring)."""
    require_server_packages()
    import uvicorn

    from prefcore._progress import library_output
    from prefcore.serve.app import Service, build_app
    from prefcore.serve.batcher import Batcher, ServedModel

    sock = bind(cfg.host, cfg.port)
    with library_output(False):
        model = ServedModel.load(cfg.reward_model, device=cfg.device, max_length=cfg.max_length)
    batcher = Batcher(model, max_batch_tokens=cfg.max_batch_tokens, max_wait_ms=cfg.max_wait_ms)
    service = Service(cfg, model, batcher)
    app = build_app(service)
    host, port = sock.getsockname()[:2]
    print(f"prefcore serve-rm: {cfg.reward_model} ({model.method}, utility {service.utility}) on "
          f"http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=cfg.graceful_timeout_s,
                            access_log=False)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT (stop accepting, finish in-flight requests) and afterwards
    # re-raises the signal to the handler that was installed before it; make that one a no-op so
    # a graceful stop ends the process with exit code 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("prefcore serve-rm: stopped", file=sys.stderr, flush=True)
