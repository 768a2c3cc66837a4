"""Training, in two halves that share the resumable loop, atomic checkpoints (:mod:`prefcore._io`)
and the metrics log (:mod:`prefcore.train.loop`):

- :mod:`prefcore.train.rm` — reward-model training (``prefcore train-rm``): the frozen-backbone
  feature cache, the five methods, and :class:`~prefcore.train.rm.RunScorer` to use a finished run;
- :mod:`prefcore.train.policy` — RLOO, GRPO and PPO against a (distributional) reward
  (``prefcore train-policy``).
"""
from prefcore.train.loop import LoopConfig, MetricsLog, run_stage

__all__ = ["LoopConfig", "MetricsLog", "run_stage"]
