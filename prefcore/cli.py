"""The ``prefcore`` command line.

``prefcore train-rm --method {bt,bt-margin,qrm,gmm,mean-var} [--data …] [--backbone …] [--out DIR]``
trains a reward model (see :mod:`prefcore.train.rm.trainer`); every flag of
:class:`prefcore.train.rm.trainer.TrainRMConfig` is accepted, or a single ``.json``/``.yaml``
file holding them. ``prefcore bench`` runs the benchmark harness of a source checkout.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "train-rm": "train a reward model (bt, bt-margin, qrm, gmm, mean-var)",
    "train-policy": "RLOO / GRPO / PPO of a causal LM against a (distributional) reward",
    "demo": "the whole pipeline on the embedded text world, with a report and plots (--quick: < 2 min)",
    "bench": "run the op benchmarks (needs a source checkout: python -m bench)",
}


def _usage() -> str:
    lines = ["usage: prefcore COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`prefcore COMMAND --help` describes each command's arguments."]
    return "\n".join(lines)


CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def config_file_flags(path: str, fields: set[str]) -> list[str]:
    """The flags a JSON/YAML config file stands for (``{"lr": 1e-3}`` → ``["--lr", "0.001"]``), so
    its values are converted and checked exactly like command-line flags."""
    import json

    import yaml

    with open(path) as f:
        data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
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


def parse_train_rm(argv: Sequence[str]):
    """Parse ``train-rm`` arguments (HfArgumentParser): flags, or a JSON/YAML config file first
    and then flags that override it (``prefcore train-rm run.yaml --resume``)."""
    import dataclasses

    from transformers import HfArgumentParser

    from prefcore.train.rm.trainer import TrainRMConfig

    parser = HfArgumentParser(TrainRMConfig, prog="prefcore train-rm",
                              description="Train a distributional (or point) reward model.")
    argv = list(argv)
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        argv = config_file_flags(argv[0], {f.name for f in dataclasses.fields(TrainRMConfig)}) + argv[1:]
    (cfg,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return cfg


def parse_demo(argv: Sequence[str]):
    """Parse ``demo`` arguments (``--out DIR --seed N --quick --no_progress``)."""
    from transformers import HfArgumentParser

    from prefcore.demo import DemoConfig

    parser = HfArgumentParser(DemoConfig, prog="prefcore demo",
                              description="Run the whole pipeline on the embedded text world and write a report.")
    (cfg,) = parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)
    return cfg


def run_demo_command(argv: Sequence[str]) -> int:
    from prefcore.demo import run_demo

    try:
        cfg = parse_demo(argv)
    except ValueError as exc:
        print(f"prefcore demo: error: {exc}", file=sys.stderr)
        return 2
    run_demo(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train-rm":
        from prefcore.train.rm.trainer import train_reward_model

        try:
            train_reward_model(parse_train_rm(rest))
        except (ValueError, FileNotFoundError) as exc:  # bad configuration or data: say what, no traceback
            print(f"prefcore train-rm: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if command == "train-policy":
        from prefcore.train.policy.cli import run_train_policy

        return run_train_policy(rest)
    if command == "demo":
        return run_demo_command(rest)
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
