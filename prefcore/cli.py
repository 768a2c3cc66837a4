"""The ``prefcore`` command line.

``prefcore train-rm --method {bt,bt-margin,qrm,gmm,mean-var} [--data …] [--backbone …] [--out DIR]``
trains a reward model (see :mod:`prefcore.train.rm.trainer`); every flag of
:class:`prefcore.train.rm.trainer.TrainRMConfig` is accepted, or a single ``.json``/``.yaml``
file holding them. ``prefcore bench`` runs the benchmark harness of a source checkout.

User errors. Every command runs through :func:`run_command`: an exception of a type in
:data:`USER_ERRORS` — :class:`UserError`, ``ValueError`` (which includes prefcore's
``DataValidationError``), ``FileNotFoundError``, ``FileExistsError``, ``IsADirectoryError``,
``NotADirectoryError``, ``PermissionError`` — is a mistake in what the user gave (a flag, a
config or data file, a model directory). It is printed as ONE line,
``prefcore COMMAND: error: MESSAGE`` on stderr, the exit code is 2, there is no traceback, and
every output path the command claimed with :func:`claim_output` that did not exist before it
started is removed (no half-written run directory). The message must name the file / flag /
line and the problem (raise ``ValueError("steps must be >= 1, got 0")``, not ``ValueError(0)``).
Any other exception is a bug and keeps its traceback. Flag parsing errors (argparse) become
user errors too, so they are one line as well.
"""
from __future__ import annotations

import contextvars
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# The parsing helpers live below every command (prefcore/_config.py); re-exported here because
# they were public names of this module.
from prefcore._config import (  # noqa: F401  (re-exports)
    CONFIG_SUFFIXES,
    UserError,
    config_file_flags,
    one_line,
    parse_config,
    user_errors_from_argparse,
)


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
    PermissionError)

EXIT_USER_ERROR = 2

_CLAIMED: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("prefcore_cli_claimed", default=None)


def claim_output(path: str | os.PathLike[str] | None) -> None:
    """Declare ``path`` an output of the running command. If it does not exist yet and the
    command then fails with a user error, :func:`run_command` removes it (file or directory
    tree). A path that already exists is never removed. Outside :func:`run_command`: no-op."""
    claims = _CLAIMED.get()
    if claims is None or path is None:
        return
    p = Path(path)
    if not os.path.lexists(p):
        claims.append(p)


def run_command(command: str, body: Callable[[], int | None], *, stderr=None) -> int:
    """Run one CLI command's ``body()`` and return its exit code (``None`` → 0).

    A user error (:data:`USER_ERRORS`) prints ``prefcore COMMAND: error: MESSAGE`` as one line
    on ``stderr`` (default ``sys.stderr``), removes the outputs claimed with
    :func:`claim_output` that the command created, and returns 2. Other exceptions propagate."""
    claims: list[Path] = []
    token = _CLAIMED.set(claims)
    try:
        code = body()
    except USER_ERRORS as exc:
        for p in reversed(claims):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                p.unlink()
        print(f"prefcore {command}: error: {one_line(exc)}", file=stderr or sys.stderr)
        return EXIT_USER_ERROR
    finally:
        _CLAIMED.reset(token)
    return 0 if code is None else int(code)


COMMANDS = {
    "train-rm": "train a reward model (bt, bt-margin, qrm, gmm, mean-var)",
    "train-policy": "RLOO / GRPO / PPO of a causal LM against a (distributional) reward",
    "export-rm": "a bt/qrm run as a plain transformers AutoModelForSequenceClassification (TRL, OpenRLHF, verl)",
    "score-rm": "score a JSONL of (prompt, response) rows with a reward model: mean, quantiles, utilities",
    "serve-rm": "serve a reward model over HTTP (OpenRLHF /get_reward, verl /classify, /v1/reward), batched",
    "demo": "the whole pipeline on the embedded text world over seeds 0,1,2, with a report and plots "
            "(<= 3 min on 2 cores; --quick: one seed, < 1 min)",
    "bench": "run the op benchmarks (needs a source checkout: python -m bench)",
}


def _usage() -> str:
    lines = ["usage: prefcore COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`prefcore COMMAND --help` describes each command's arguments."]
    return "\n".join(lines)


def parse_train_rm(argv: Sequence[str]):
    """Parse ``train-rm`` arguments (:func:`prefcore.train.rm.cli.parse_train_rm`; kept here for callers)."""
    from prefcore.train.rm.cli import parse_train_rm as parse

    return parse(argv)


def _train_rm(argv: Sequence[str]) -> None:
    from prefcore.train.rm.trainer import train_reward_model

    cfg = parse_train_rm(argv)
    if not cfg.resume:
        claim_output(cfg.out)  # a run directory this command creates is removed again on a user error
    train_reward_model(cfg)


def _train_policy(argv: Sequence[str]) -> None:
    from prefcore.train.policy.cli import parse_train_policy, print_summary
    from prefcore.train.policy.trainer import train_policy

    cfg = parse_train_policy(argv)
    if not cfg.resume:
        claim_output(cfg.run_dir)
    print_summary(train_policy(cfg))


def positional_run_dir(argv: Sequence[str], flag: str = "--run_dir") -> list[str]:
    """``DIR --out X`` → ``--run_dir DIR --out X`` (a leading positional run directory)."""
    argv = list(argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith(CONFIG_SUFFIXES):
        return [flag, argv[0], *argv[1:]]
    return argv


def _export_rm(argv: Sequence[str]) -> None:
    from prefcore.train.rm.export import ExportRMConfig, export_reward_model

    cfg = parse_config(ExportRMConfig, positional_run_dir(argv), prog="prefcore export-rm",
                       description="Export a train-rm run as a transformers AutoModelForSequenceClassification.")
    claim_output(cfg.out)
    export_reward_model(cfg)


def _score_rm(argv: Sequence[str]) -> None:
    from prefcore.train.rm.score import ScoreRMConfig, score_reward_model

    cfg = parse_config(ScoreRMConfig, argv, prog="prefcore score-rm",
                       description="Score (prompt, response) rows with a reward model.")
    score_reward_model(cfg)


def _serve_rm(argv: Sequence[str]) -> None:
    from prefcore.serve.config import ServeConfig
    from prefcore.serve.server import serve

    cfg = parse_config(ServeConfig, positional_run_dir(argv, flag="--reward_model"), prog="prefcore serve-rm",
                       description="Serve a train-rm run over HTTP with cross-request batching.")
    serve(cfg)


def parse_demo(argv: Sequence[str]):
    """Parse ``demo`` arguments (``--out DIR --seeds 0,1,2 --quick --no_progress``)."""
    from prefcore.demo import DemoConfig

    return parse_config(DemoConfig, argv, prog="prefcore demo",
                        description="Run the whole pipeline on the embedded text world over several seeds "
                                    "and write a report.")


def _demo(argv: Sequence[str]) -> None:
    from prefcore.demo import run_demo

    run_demo(parse_demo(argv))  # resumable: an existing OUT is reused, never removed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train-rm":
        return run_command(command, lambda: _train_rm(rest))
    if command == "train-policy":
        return run_command(command, lambda: _train_policy(rest))
    if command == "demo":
        return run_command(command, lambda: _demo(rest))
    if command == "export-rm":
        return run_command(command, lambda: _export_rm(rest))
    if command == "score-rm":
        return run_command(command, lambda: _score_rm(rest))
    if command == "serve-rm":
        return run_command(command, lambda: _serve_rm(rest))
    if command == "bench":
        try:
            from bench.harness import main as bench_main
        except ImportError:
            print("prefcore bench needs a source checkout: run `python -m bench` from the repository root",
                  file=sys.stderr)
            return 2
        return bench_main(rest)
    print(f"prefcore: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
