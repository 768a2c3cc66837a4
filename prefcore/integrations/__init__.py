"""Adapters to other libraries. :mod:`prefcore.integrations.trl`: a prefcore reward-model run as a
TRL ``reward_funcs`` callable (TRL itself is imported only by the caller)."""
