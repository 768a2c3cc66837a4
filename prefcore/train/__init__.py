"""Training: the resumable training loop and its checkpoints, the frozen-backbone feature cache
(:mod:`prefcore.train.features`) and reward-model training (:mod:`prefcore.train.reward_model`)."""
from prefcore.train.checkpoint import atomic_save, atomic_write_bytes, atomic_write_text
from prefcore.train.loop import LoopConfig, MetricsLog, run_stage

__all__ = ["LoopConfig", "MetricsLog", "atomic_save", "atomic_write_bytes", "atomic_write_text", "run_stage"]
