"""Reward-model training (``prefcore train-rm``): :class:`TrainRMConfig` and
:func:`train_reward_model` (:mod:`.trainer`), the methods and their held-out metrics
(:mod:`.methods`), data sources (:mod:`.sources`, :mod:`.synthetic`, :mod:`.data`), the feature
cache for frozen backbones (:mod:`.features`) and :class:`RunScorer` to score texts with a finished
run (:mod:`.scoring`)."""
from prefcore.train.rm.scoring import RunScorer, risk_reward
from prefcore.train.rm.trainer import TrainRMConfig, train_reward_model

__all__ = ["TrainRMConfig", "train_reward_model", "RunScorer", "risk_reward"]
