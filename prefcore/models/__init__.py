"""prefcore.models: reward heads, the gating network and RewardModel on a transformers backbone.

transformers is imported lazily (only when a backbone is loaded), so the heads can be used on
cached features without it.
"""
from __future__ import annotations

from prefcore.models.config import HEAD_TYPES, HeadConfig, build_head, head_config_from_dict, head_config_to_dict
from prefcore.models.gating import GatingNetwork, GatingNetworkConfig
from prefcore.models.heads import (
    GMMHead,
    GMMHeadConfig,
    MeanVariance,
    MeanVarianceHead,
    MeanVarianceHeadConfig,
    MixtureParams,
    QuantileHead,
    QuantileHeadConfig,
    ScalarHead,
    ScalarHeadConfig,
    default_taus,
)
from prefcore.models.packing import PACKING, PackingChoice, PairFeatures, pair_features, resolve_packing
from prefcore.models.pooling import POOLINGS, pooled_features, position_ids_from_mask
from prefcore.models.reward_model import RewardModel, load_backbone

__all__ = [
    "HEAD_TYPES", "POOLINGS", "GMMHead", "GMMHeadConfig", "GatingNetwork", "GatingNetworkConfig", "HeadConfig",
    "MeanVariance", "MeanVarianceHead", "MeanVarianceHeadConfig", "MixtureParams", "QuantileHead",
    "QuantileHeadConfig", "RewardModel", "ScalarHead", "ScalarHeadConfig", "build_head", "default_taus",
    "head_config_from_dict", "head_config_to_dict", "load_backbone", "pooled_features", "position_ids_from_mask",
    "PACKING", "PackingChoice", "PairFeatures", "pair_features", "resolve_packing",
]
