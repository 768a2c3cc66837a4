"""Parsing a command's config dataclass from flags or a JSON/YAML file, and the user-error type.

This module sits *below* :mod:`prefcore.cli` and every command implementation (``prefcore.demo``,
``prefcore.train.policy.cli``, ``prefcore.train.rm.cli``), so those can parse their own or each
other's flags without importing the CLI entry point (which imports them: a cycle).
:mod:`prefcore.cli` re-exports every name here for backwards compatibility.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["CONFIG_SUFFIXES", "UserError", "config_file_flags", "one_line", "parse_config",
           "user_errors_from_argparse"]


class UserError(Exception):
    """A mistake in the user's input, reported by the CLI as one line with exit code 2.

    Raise it (or ``ValueError`` / ``FileNotFoundError``, which the CLI treats the same) with a
    message naming the file, flag or line and what is wrong with it."""


CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (line breaks and runs of spaces collapsed)."""
    text = str(exc)
    if isinstance(exc, KeyError) and exc.args:  # KeyError's str() is the repr of its key
        text = str(exc.args[0])
    parts = [" ".join(line.split()) for line in text.splitlines()]
    return "; ".join(p for p in parts if p) or type(exc).__name__


def config_file_flags(path: str, fields: set[str]) -> list[str]:
    """The flags a JSON/YAML config file stands for (``{"lr": 1e-3}`` → ``["--lr", "0.001"]``), so
    its values are converted and checked exactly like command-line flags."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"config file {path!r}, line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or one_line(exc)
        raise UserError(f"config file {path!r}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of option names to values, got {type(data).__name__}")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"config file {path!r}: unknown options {unknown} (known: {sorted(fields)})")
    flags: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            raise ValueError(f"config file {path!r}: option {key!r} must be a single value, got {value!r}")
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def user_errors_from_argparse(parser) -> None:
    """Make ``parser`` raise :class:`UserError` (one line via :func:`prefcore.cli.run_command`)
    instead of printing its usage block and exiting; ``--help`` still prints the help and exits 0."""
    prog = parser.prog

    def error(message: str):
        raise UserError(f"{message} (see `{prog} --help`)")

    parser.error = error


def parse_config(config_cls: type, argv: Sequence[str], *, prog: str, description: str) -> Any:
    """Parse a command's config dataclass with HfArgumentParser: flags, or a JSON/YAML config file
    first and then flags that override it (``prefcore train-rm run.yaml --resume``); flag errors
    are user errors (one line)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_cls, prog=prog, description=description)
    user_errors_from_argparse(parser)
    argv = list(argv)
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        argv = config_file_flags(argv[0], {f.name for f in dataclasses.fields(config_cls)}) + argv[1:]
    (cfg,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return cfg
