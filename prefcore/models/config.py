"""Head configs as data: build a head from its config and (de)serialise configs as JSON dicts."""
from __future__ import annotations

import dataclasses
from typing import Union


from prefcore.models.gating import GatingNetwork, GatingNetworkConfig
from prefcore.models.heads import (
    GMMHead,
    GMMHeadConfig,
    MeanVarianceHead,
    MeanVarianceHeadConfig,
    QuantileHead,
    QuantileHeadConfig,
    ScalarHead,
    ScalarHeadConfig,
)

HeadConfig = Union[QuantileHeadConfig, GMMHeadConfig, ScalarHeadConfig, MeanVarianceHeadConfig, GatingNetworkConfig]
Head = Union[QuantileHead, GMMHead, ScalarHead, MeanVarianceHead, GatingNetwork]

HEAD_TYPES: dict[str, tuple[type, type]] = {
    cfg.kind: (cfg, head)
    for cfg, head in (
        (QuantileHeadConfig, QuantileHead),
        (GMMHeadConfig, GMMHead),
        (ScalarHeadConfig, ScalarHead),
        (MeanVarianceHeadConfig, MeanVarianceHead),
        (GatingNetworkConfig, GatingNetwork),
    )
}


def _kind_of(config: object) -> str:
    for kind, (cfg_type, _) in HEAD_TYPES.items():
        if type(config) is cfg_type:
            return kind
    raise TypeError(f"head config must be one of {[c.__name__ for c, _ in HEAD_TYPES.values()]}, got {type(config).__name__}")


def build_head(config: HeadConfig) -> Head:
    """A freshly initialised head for ``config``."""
    return HEAD_TYPES[_kind_of(config)][1].from_config(config)


def head_config_to_dict(config: HeadConfig) -> dict[str, object]:
    """JSON-ready dict: ``{"kind": ..., <fields>}`` (tuples become lists)."""
    out: dict[str, object] = {"kind": _kind_of(config)}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def head_config_from_dict(data: dict[str, object]) -> HeadConfig:
    """Inverse of :func:`head_config_to_dict`; unknown kinds or fields raise ``ValueError``."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"head config must be a dict with a 'kind' key, got {data!r}")
    kind = data["kind"]
    if kind not in HEAD_TYPES:
        raise ValueError(f"head config kind must be one of {tuple(HEAD_TYPES)}, got {kind!r}")
    cfg_type = HEAD_TYPES[kind][0]
    names = {f.name for f in dataclasses.fields(cfg_type)}
    fields = {k: v for k, v in data.items() if k != "kind"}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"head config of kind {kind!r} has unknown fields {unknown}; expected a subset of {sorted(names)}")
    return cfg_type(**fields)
