"""Training: the resumable training loop (atomic checkpoints via :mod:`prefcore._io`), the frozen-backbone feature cache
(:mod:`prefcore.train.features`) and reward-model training (:mod:`prefcore.train.reward_model`)."""
from prefcore.train.loop import LoopConfig, MetricsLog, run_stage

__all__ = ["LoopConfig", "MetricsLog", "run_stage"]
