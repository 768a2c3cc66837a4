"""``prefcore train-policy``: :class:`PolicyConfig` from flags, or a JSON/YAML file then flags
that override it (``prefcore train-policy run.yaml --max_steps 10``), parsed by HfArgumentParser."""
from __future__ import annotations

import os
from collections.abc import Sequence


def parse_train_policy(argv: Sequence[str]):
    """Parse ``train-policy`` arguments (:func:`prefcore._config.parse_config` of :class:`PolicyConfig`)."""
    from prefcore._config import parse_config
    from prefcore.train.policy.config import PolicyConfig

    return parse_config(PolicyConfig, argv, prog="prefcore train-policy",
                        description="Risk-aware RLOO / GRPO / PPO of a causal LM against a reward.")


def print_summary(result: dict) -> None:
    """The one line ``prefcore train-policy`` prints when a run ends (rank 0 only)."""
    m = result["metrics"]
    if m and int(os.environ.get("RANK", "0")) == 0:
        print(f"prefcore train-policy → {result['output_dir']} (step {result['step']}: reward {m['reward']:.4f}, "
              f"utility {m['utility']:.4f}, kl {m['kl']:.4f})")
