"""RewardModel: a reward head on a transformers backbone, with pooling and safetensors save/load.

On-disk layout of ``RewardModel.save(directory)``::

    directory/
      prefcore_reward_model.json   pooling, head config, how to find the backbone, hashes
      head.safetensors             the head's state dict (dtypes kept)
      backbone/                    backbone.save_pretrained(...)  (only with backbone="copy")

Backbone storage (decision): by default the backbone is **copied** into ``backbone/`` so a
saved model is self-contained and cannot silently change under it. For a frozen backbone that
was loaded from a local path, ``save(directory, backbone="reference")`` records that path
instead (no multi-GB copy per checkpoint) together with the SHA-256 of the backbone's
weights; :meth:`RewardModel.load` re-hashes the referenced weights and refuses them if they
differ (``verify=False`` skips that cost for very large backbones).

Every file is written atomically (temporary file + ``os.replace``); the JSON is written last
and holds the SHA-256 of ``head.safetensors``, so an interrupted save over an older one is
detected at load instead of mixing two checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from prefcore._io import atomic_save_safetensors, atomic_write_json, sha256_file, sha256_state_dict
from prefcore.models.config import HEAD_TYPES, HeadConfig, build_head, head_config_from_dict, head_config_to_dict
from prefcore.models.heads import GMMHead, MeanVarianceHead, MixtureParams, QuantileHead
from prefcore.models.pooling import POOLINGS, pooled_features
from prefcore.ops._checks import require_choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG_NAME = "prefcore_reward_model.json"
HEAD_WEIGHTS_NAME = "head.safetensors"
BACKBONE_SUBFOLDER = "backbone"
FORMAT_VERSION = 1
BACKBONE_MODES = ("copy", "reference")


def backbone_hidden_size(backbone: nn.Module) -> int | None:
    """``backbone.config.hidden_size`` when the backbone has a transformers config, else None."""
    size = getattr(getattr(backbone, "config", None), "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def load_backbone(path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` from a local directory only (never the hub)."""
    from transformers import AutoModel  # imported lazily: transformers is slow to import

    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise ValueError(f"backbone path must be a local directory with a config.json (from save_pretrained), got {str(path)!r}")
    kwargs: dict[str, object] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModel.from_pretrained(str(p), **kwargs)


class RewardModel(nn.Module):
    """A reward head on a transformers backbone: token ids → pooled features → head output.

    ``backbone``: any transformers model whose output has ``last_hidden_state (B, T, D)``
    (``AutoModel``); a model with a task head (e.g. ``…ForCausalLM``) is replaced by its
    ``base_model``. ``head``: a prefcore head (:class:`QuantileHead`, :class:`GMMHead`,
    :class:`ScalarHead`, :class:`MeanVarianceHead`, :class:`GatingNetwork` — the last for a model
    of prompt-only text) whose ``in_features`` equals the backbone's hidden size.
    ``pooling``: ``"last"`` (hidden state of the last attended token) or ``"mean"``; either is
    independent of padding side and batch composition (see :mod:`prefcore.models.pooling`).

    ``freeze_backbone=True`` turns off the backbone's gradients, keeps it in eval mode even
    under ``model.train()`` (no dropout in frozen features) and runs it under ``torch.no_grad``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, pooling: str = "last",
                 freeze_backbone: bool = False, backbone_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        require_choice(pooling, "pooling", POOLINGS)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module (a transformers model), got {type(backbone).__name__}")
        if not isinstance(head, tuple(h for _, h in HEAD_TYPES.values())):
            names = ", ".join(h.__name__ for _, h in HEAD_TYPES.values())
            raise TypeError(f"head must be a prefcore head ({names}), got {type(head).__name__}")
        backbone = getattr(backbone, "base_model", backbone)
        hidden = backbone_hidden_size(backbone)
        in_features = head.config.in_features
        if hidden is not None and hidden != in_features:
            raise ValueError(f"head in_features must equal the backbone hidden size {hidden}, got in_features={in_features}")
        self.backbone = backbone
        self.head = head
        self.pooling = pooling
        self.backbone_path = str(Path(backbone_path).resolve()) if backbone_path is not None else None
        self._frozen = False
        if freeze_backbone:
            self.freeze_backbone()

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_pretrained_backbone(cls, path: str | os.PathLike[str], head_config: HeadConfig | dict[str, object], *,
                                 freeze_backbone: bool = True, pooling: str = "last",
                                 dtype: torch.dtype | None = None) -> RewardModel:
        """Load ``AutoModel`` from the local directory ``path`` and put a new head on it.

        ``head_config`` is a head config dataclass or its dict form (``{"kind": "quantile", ...}``);
        in the dict form ``in_features`` may be left out and is then the backbone's hidden size.
        ``dtype`` is the backbone's dtype (default: as saved); the head is float32.
        """
        require_choice(pooling, "pooling", POOLINGS)
        backbone = load_backbone(path, dtype)
        if isinstance(head_config, dict):
            data = dict(head_config)
            if "in_features" not in data and backbone_hidden_size(backbone) is not None:
                data["in_features"] = backbone_hidden_size(backbone)
            head_config = head_config_from_dict(data)
        return cls(backbone, build_head(head_config), pooling=pooling, freeze_backbone=freeze_backbone, backbone_path=path)

    # ---- freezing ----------------------------------------------------------------------

    @property
    def backbone_frozen(self) -> bool:
        return self._frozen

    def freeze_backbone(self) -> RewardModel:
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self._frozen = True
        return self

    def unfreeze_backbone(self) -> RewardModel:
        self.backbone.requires_grad_(True)
        self.backbone.train(self.training)
        self._frozen = False
        return self

    def train(self, mode: bool = True) -> RewardModel:
        super().train(mode)
        if self._frozen:
            self.backbone.eval()  # frozen features must not see dropout
        return self

    # ---- forward -----------------------------------------------------------------------

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features ``(B, D)`` for ``input_ids (B, T)``, ``attention_mask (B, T)``."""
        if self._frozen:
            with torch.no_grad():
                return pooled_features(self.backbone, input_ids, attention_mask, self.pooling)
        return pooled_features(self.backbone, input_ids, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The head's output on the pooled features: ``(B, M, Q)`` quantiles, ``MixtureParams``
        (each ``(B, K)``), ``(B,)`` rewards, ``MeanVariance`` or ``(B, M)`` gate weights."""
        return self.head(self.features(input_ids, attention_mask))

    def reward_distribution(self, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor | MixtureParams:
        """The predicted reward distribution: quantiles ``(B, M, Q)`` (levels ``head.taus``) for a
        :class:`QuantileHead`; ``MixtureParams`` ``(B, K)`` for a :class:`GMMHead`; for a
        :class:`MeanVarianceHead` the Gaussian as a one-component mixture
        (``logits = 0``, ``mu = mean``, ``log_sigma = log_var / 2``, each ``(B, 1)``)."""
        if not isinstance(self.head, (QuantileHead, GMMHead, MeanVarianceHead)):
            raise TypeError(
                "reward_distribution needs a distributional head (QuantileHead, GMMHead or MeanVarianceHead), "
                f"got {type(self.head).__name__}; call the model instead"
            )
        out = self(input_ids, attention_mask)
        if isinstance(self.head, MeanVarianceHead):
            mean, log_var = out
            return MixtureParams(torch.zeros_like(mean).unsqueeze(-1), mean.unsqueeze(-1), (0.5 * log_var).unsqueeze(-1))
        return out

    # ---- save / load -------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str], *, backbone: Literal["copy", "reference"] = "copy") -> None:
        """Save to ``directory`` (created if needed; an earlier save there is replaced).

        ``backbone="copy"``: ``save_pretrained`` into ``directory/backbone``. ``"reference"``:
        record the absolute path the frozen backbone was loaded from and the SHA-256 of its
        weights (needs a frozen backbone built by :meth:`from_pretrained_backbone` or given a
        ``backbone_path``). See the module docstring for the layout.
        """
        require_choice(backbone, "backbone", BACKBONE_MODES)
        if backbone == "reference" and not (self._frozen and self.backbone_path is not None):
            raise ValueError(
                "backbone='reference' needs a frozen backbone loaded from a path "
                f"(frozen={self._frozen}, backbone_path={self.backbone_path!r}); use backbone='copy'"
            )
        if not hasattr(self.backbone, "save_pretrained") and backbone == "copy":
            raise TypeError(f"backbone must be a transformers PreTrainedModel to be saved, got {type(self.backbone).__name__}")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        head_path = out / HEAD_WEIGHTS_NAME
        atomic_save_safetensors(head_path, dict(self.head.state_dict()))
        if backbone == "copy":
            backbone_info: dict[str, object] = {"mode": "copy", "subfolder": BACKBONE_SUBFOLDER}
            _save_pretrained_atomically(self.backbone, out / BACKBONE_SUBFOLDER)
        else:
            backbone_info = {"mode": "reference", "path": self.backbone_path,
                             "sha256": sha256_state_dict(self.backbone.state_dict())}
        atomic_write_json(out / CONFIG_NAME, {
            "format_version": FORMAT_VERSION,
            "pooling": self.pooling,
            "head": head_config_to_dict(self.head.config),
            "head_weights": HEAD_WEIGHTS_NAME,
            "head_sha256": sha256_file(head_path),
            "backbone": backbone_info,
            "backbone_class": type(self.backbone).__name__,
            "backbone_frozen": self._frozen,
        })

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
             verify: bool = True) -> RewardModel:
        """Load a model written by :meth:`save` (on the CPU; move it with ``.to``).

        ``dtype``: the backbone's dtype (default: as saved); the head keeps its saved dtypes.
        ``verify``: check the head file's hash and, for a referenced backbone, that its weights
        are still the ones saved (hashes every weight once)."""
        root = Path(directory)
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise ValueError(f"{str(directory)!r} is not a saved RewardModel: {CONFIG_NAME} not found")
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{CONFIG_NAME} format_version must be {FORMAT_VERSION}, got {cfg.get('format_version')!r}")
        head_path = root / cfg["head_weights"]
        if verify and sha256_file(head_path) != cfg["head_sha256"]:
            raise ValueError(f"{head_path} does not match the hash in {CONFIG_NAME} (interrupted or mixed save?)")
        head = build_head(head_config_from_dict(cfg["head"]))
        head.load_state_dict(load_file(str(head_path)), strict=True, assign=True)
        info = cfg["backbone"]
        require_choice(info.get("mode"), "backbone mode in " + CONFIG_NAME, BACKBONE_MODES)
        if info["mode"] == "copy":
            backbone = load_backbone(root / info["subfolder"], dtype)
            path = None
        else:
            path = info["path"]
            backbone = load_backbone(path, dtype)
            if verify and sha256_state_dict(backbone.state_dict()) != info["sha256"]:
                raise ValueError(f"the backbone weights at the referenced path {path!r} changed since this model was saved")
        model = cls(backbone, head, pooling=cfg["pooling"], freeze_backbone=bool(cfg["backbone_frozen"]), backbone_path=path)
        return model


def _save_pretrained_atomically(backbone: nn.Module, target: Path) -> None:
    """``save_pretrained`` into a fresh sibling folder, then swap it in for ``target``."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        backbone.save_pretrained(str(tmp))  # type: ignore[operator]
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
