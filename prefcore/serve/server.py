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
    """A listening socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say they are TCP;
    # without it, keep-alive connections wait ~40 ms per response (Nagle + delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def check_utility(cfg: ServeConfig, model) -> None:
    if model.kind == "scalar" and not cfg.parsed_utility.is_risk_neutral:
        raise ValueError(f"--utility {cfg.utility!r} needs a distributional reward model, but "
                         f"{cfg.reward_model!r} is a {model.method} run (scalar rewards): use --utility mean")


def serve(cfg: ServeConfig) -> None:
    """Serve ``cfg.reward_model`` until stopped (see the module docstring)."""
    require_server_packages()
    import uvicorn

    from prefcore._progress import library_output
    from prefcore.serve.app import Service, build_app
    from prefcore.serve.batcher import Batcher, ServedModel

    with library_output(False):
        model = ServedModel.load(cfg.reward_model, device=cfg.device, max_length=cfg.max_length)
    check_utility(cfg, model)
    batcher = Batcher(model, cfg.parsed_utility, max_batch_tokens=cfg.max_batch_tokens, max_wait_ms=cfg.max_wait_ms)
    service = Service(cfg, model, batcher)
    app = build_app(service)
    try:
        sock = bind(cfg.host, cfg.port)
    except ValueError:
        batcher.close()
        raise
    host, port = sock.getsockname()[:2]
    print(f"prefcore serve-rm: {cfg.reward_model} ({model.method}, utility {service.utility}) on "
          f"http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=cfg.graceful_timeout_s,
                            access_log=False)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT (stop accepting, finish in-flight requests) and afterwards
    # re-raises the signal to the handler that was installed before it; make that one a no-op so
    # a graceful stop ends the process with exit code 0 instead of dying by the signal.
    before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    print("prefcore serve-rm: stopped", file=sys.stderr, flush=True)
