"""Policy optimisation (``prefcore train-policy``): risk-aware RLOO, GRPO and PPO on any local
causal LM against a (distributional) reward — :class:`PolicyConfig`, :class:`PolicyTrainer`,
:func:`train_policy` (:mod:`.trainer`), reward adapters (:mod:`.rewards`), sampling with a KV
cache (:mod:`.sampling`), log-probs from hidden states (:mod:`.logprobs`), losses (:mod:`.losses`)."""
from prefcore.train.policy.config import PolicyConfig
from prefcore.train.policy.trainer import PolicyTrainer, default_world_setup, train_policy

__all__ = ["PolicyConfig", "PolicyTrainer", "train_policy", "default_world_setup"]
