"""``prefcore train-policy``: :class:`PolicyConfig` from flags, or a JSON/YAML file then flags
that override it (``prefcore train-policy run.yaml --max_steps 10``), parsed by HfArgumentParser."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence


def parse_train_policy(argv: Sequence[str]):
    from transformers import HfArgumentParser

    from prefcore.cli import CONFIG_SUFFIXES, config_file_flags
    from prefcore.train.policy.config import PolicyConfig

    from prefcore.cli import user_errors_from_argparse

    parser = HfArgumentParser(PolicyConfig, prog="prefcore train-policy",
                              description="Risk-aware RLOO / GRPO / PPO of a causal LM against a reward.")
    user_errors_from_argparse(parser)
    argv = list(argv)
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        argv = config_file_flags(argv[0], {f.name for f in dataclasses.fields(PolicyConfig)}) + argv[1:]
    (cfg,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return cfg


def print_summary(result: dict) -> None:
    """The one line ``prefcore train-policy`` prints when a run ends (rank 0 only)."""
    m = result["metrics"]
    if m and int(os.environ.get("RANK", "0")) == 0:
        print(f"prefcore train-policy → {result['output_dir']} (step {result['step']}: reward {m['reward']:.4f}, "
              f"utility {m['utility']:.4f}, kl {m['kl']:.4f})")
