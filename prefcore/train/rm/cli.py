"""``prefcore train-rm``: :class:`TrainRMConfig` from flags, or a JSON/YAML file then flags that
override it (``prefcore train-rm run.yaml --resume``), parsed by HfArgumentParser."""
from __future__ import annotations

from collections.abc import Sequence

from prefcore._config import parse_config


def parse_train_rm(argv: Sequence[str]):
    """Parse ``train-rm`` arguments (:func:`prefcore._config.parse_config` of ``TrainRMConfig``)."""
    from prefcore.train.rm.trainer import TrainRMConfig

    return parse_config(TrainRMConfig, argv, prog="prefcore train-rm",
                        description="Train a distributional (or point) reward model.")
