"""The ``prefcore`` command line.

``prefcore train-rm --method {bt,bt-margin,qrm,gmm,mean-var} [--data …] [--backbone …] [--out DIR]``
trains a reward model (see :mod:`prefcore.train.reward_model`); every flag of
:class:`prefcore.train.reward_model.TrainRMConfig` is accepted, or a single ``.json``/``.yaml``
file holding them. ``prefcore bench`` runs the benchmark harness of a source checkout.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "train-rm": "train a reward model (bt, bt-margin, qrm, gmm, mean-var)",
    "bench": "run the op benchmarks (needs a source checkout: python -m bench)",
}


def _usage() -> str:
    lines = ["usage: prefcore COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`prefcore COMMAND --help` describes each command's arguments."]
    return "\n".join(lines)


def parse_train_rm(argv: Sequence[str]):
    """Parse ``train-rm`` arguments: flags, or one JSON/YAML config file (HfArgumentParser)."""
    from transformers import HfArgumentParser

    from prefcore.train.reward_model import TrainRMConfig

    parser = HfArgumentParser(TrainRMConfig, prog="prefcore train-rm",
                              description="Train a distributional (or point) reward model.")
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        if argv[0].endswith(".json"):
            (cfg,) = parser.parse_json_file(argv[0])
        else:
            (cfg,) = parser.parse_yaml_file(argv[0])
        return cfg
    (cfg,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train-rm":
        from prefcore.train.reward_model import train_reward_model

        try:
            train_reward_model(parse_train_rm(rest))
        except (ValueError, FileNotFoundError) as exc:  # bad configuration or data: say what, no traceback
            print(f"prefcore train-rm: error: {exc}", file=sys.stderr)
            return 2
        return 0
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
