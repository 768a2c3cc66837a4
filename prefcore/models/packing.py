"""Pair features with the prompt encoded once: ``[prompt | chosen | rejected]`` as one packed
sequence per pair, with a block attention mask.

A preference pair ``(x, y_c, y_r)`` is usually scored as two sequences ``x + y_c`` and
``x + y_r``, so the prompt ``x`` runs through the backbone twice, forward and backward. With a
causal backbone the prompt's hidden states do not depend on what follows it, so both responses
can share one copy of them: pair ``i`` becomes the padding-free row

    tokens     x_1 … x_P   c_1 … c_C        r_1 … r_R
    positions  0 … P−1     P … P+C−1        P … P+R−1     (both responses continue the prompt)

with a 4-D attention mask where query ``q`` sees key ``k`` iff ``k ≤ q`` and ``k`` is in the
prompt or in ``q``'s own segment: the prompt and each response are causal, and the two
responses never see each other. Every token then computes exactly what it computes in its own
plain sequence (same keys, same positions), so the pooled last tokens of ``c`` and ``r`` (and
their gradients) equal the two-sequence forward up to floating-point rounding, for
``(P + C + R)`` instead of ``2P + C + R`` tokens per pair. Rows are right-padded to the batch's
longest pair (use :class:`prefcore.data.LengthGroupedBatchSampler` to keep that small); a pad
query sees only itself (a fully masked row would give NaN in eager attention).

The backbone is always called as its base model (``model.base_model``), so a ``…ForCausalLM``
never runs its LM head: the result is hidden states, ``(B, H)``.

The custom mask is honoured by transformers (5.x) models that build their masks with
``masking_utils.create_causal_mask`` (a 4-D mask is passed through as given) under the
``eager`` or ``sdpa`` attention implementation and take ``position_ids`` — Llama, Qwen2,
Mistral without a sliding window, GPT-2, … :func:`resolve_packing` checks that; ``"auto"``
falls back to the plain forward, with the reason, for anything else (flash-attention, flex,
sliding windows, ALiBi, bidirectional encoders, non-transformers modules).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from prefcore.models.pooling import check_batch, pack_left, pooled_features
from prefcore.ops._checks import require_choice, shape_str

PACKING = ("auto", "packed", "plain")
_MASK_ATTENTION = ("eager", "sdpa")  # implementations that add a dense 4-D mask as given


@dataclass(frozen=True)
class PackingChoice:
    """``mode``: ``"packed"`` or ``"plain"``; ``reason``: why, for the log."""

    mode: str
    reason: str


@dataclass(frozen=True)
class PairFeatures:
    """Pooled last-token hidden states of ``prompt + chosen`` and ``prompt + rejected``, each
    ``(B, H)`` in the backbone's dtype; ``mode`` is the forward that produced them."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    mode: str


def transformers_base(backbone: nn.Module) -> nn.Module:
    """The transformers base model inside ``backbone`` (``LlamaModel`` for a ``LlamaForCausalLM``,
    the wrapped model of a peft ``PeftModel``), else ``backbone.base_model`` or ``backbone``.
    LoRA layers are injected into the modules, so calling the inner model keeps them."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return getattr(backbone, "base_model", backbone)
    m: object = backbone
    for _ in range(4):  # PeftModel → LoraModel → PreTrainedModel
        if isinstance(m, PreTrainedModel):
            return m.base_model
        inner = getattr(m, "base_model", None)
        inner = inner if inner is not None and inner is not m else getattr(m, "model", None)
        if not isinstance(inner, nn.Module):
            break
        m = inner
    return getattr(backbone, "base_model", backbone)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _packed_unsupported(backbone: nn.Module) -> str | None:
    """Why the packed forward would not equal the plain one for ``backbone``, or None."""
    base = transformers_base(backbone)
    config = getattr(base, "config", None)
    if config is None:
        return f"{type(base).__name__} is not a transformers model (no config)"
    name = f"{type(base).__name__}"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _MASK_ATTENTION:
        return f"{name} uses attn_implementation={impl!r}; a custom 4-D mask needs one of {_MASK_ATTENTION}"
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_causal", True) is False \
            or getattr(config, "is_decoder", True) is False:  # BERT-like configs say is_decoder=False
        return f"{name} is not a causal decoder (its attention is bidirectional)"
    module = inspect.getmodule(type(base))
    if module is None or "create_causal_mask" not in vars(module):
        return f"{name} does not build its mask with transformers' create_causal_mask (a 4-D mask may not pass through)"
    if not (_accepts(base, "position_ids") and _accepts(base, "attention_mask")):
        return f"{name}.forward does not take position_ids and attention_mask"
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return f"{name} has sliding-window attention (a custom 4-D mask would replace the window)"
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "rope") == "alibi" \
            or config.model_type in ("bloom", "mpt"):
        return f"{name} uses ALiBi position biases, which do not follow position_ids"
    return None


PAIR_LAYOUT = ("prompt encoded once, [prompt|chosen|rejected] with a block mask",
               "prompt + chosen and prompt + rejected run as two sequences")
TEXT_LAYOUT = ("texts packed several to a row with a block mask", "one padded row per text")


def resolve_packing(packing: str, backbone: nn.Module, layout: tuple[str, str] = PAIR_LAYOUT) -> PackingChoice:
    """Which pair (or, with ``layout=TEXT_LAYOUT``, text) forward ``packing`` selects for
    ``backbone``; ``layout`` names the packed and the plain forward in the reason.

    ``"auto"`` → ``"packed"`` when the backbone honours a custom 4-D attention mask and
    ``position_ids`` (see the module docstring), else ``"plain"``; the reason says which.
    ``"packed"`` on a backbone that cannot take it raises ``ValueError`` with the reason
    (no silent fallback); ``"plain"`` is always allowed."""
    require_choice(packing, "packing", PACKING)
    if packing == "plain":
        return PackingChoice("plain", f"packing='plain' requested: {layout[1]}")
    why_not = _packed_unsupported(backbone)
    if why_not is None:
        impl = transformers_base(backbone).config._attn_implementation
        how = "requested" if packing == "packed" else "auto"
        return PackingChoice("packed", f"packing={how}: {layout[0]} "
                                       f"({type(transformers_base(backbone)).__name__}, attn_implementation={impl})")
    if packing == "packed":
        raise ValueError(f"packing='packed' is not supported for this backbone: {why_not}; use packing='plain' or 'auto'")
    return PackingChoice("plain", f"packing=auto chose plain: {why_not}")


def _segment(x: object, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, mask)`` of a segment given as a mapping with ``input_ids`` / ``attention_mask``
    (a tokenizer's ``BatchEncoding``) or as an ``(input_ids, attention_mask)`` tuple."""
    if isinstance(x, Mapping):
        if "input_ids" not in x:
            raise ValueError(f"{name} must hold 'input_ids' (and 'attention_mask'), got keys {sorted(x)}")
        ids, mask = x["input_ids"], x.get("attention_mask")
    elif isinstance(x, (tuple, list)) and len(x) == 2:
        ids, mask = x
    else:
        raise TypeError(f"{name} must be a mapping with input_ids/attention_mask or an (input_ids, attention_mask) "
                        f"tuple, got {type(x).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = shape_str(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} input_ids must be a (B, T) tensor, got {got}")
    if ids.shape[1] == 0:  # an all-empty prompt batch: nothing for check_batch to look at
        return ids, torch.zeros_like(ids, dtype=torch.bool)
    try:
        return check_batch(ids, mask)
    except ValueError as exc:
        if name == "prompt" and "at least one attended token" in str(exc):
            # an empty prompt is fine (a response truncated to max_length keeps none of it)
            return ids, (mask.bool() if mask.dtype != torch.bool else mask)
        raise ValueError(f"{name}: {exc}") from None


def _concat_rows(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)


def _stack_rows(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` on top of ``b``, the narrower right-padded (masked) to the wider."""
    w = max(a[0].shape[1], b[0].shape[1])
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, w - t.shape[1]), value=fill)  # noqa: E731
    return torch.cat([pad(a[0], 0), pad(b[0], 0)]), torch.cat([pad(a[1], False), pad(b[1], False)])


def _plain(backbone: nn.Module, p, c, r) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sequences of every pair in one batch of ``2B`` rows (interior padding between the
    prompt and the response is removed by ``pooled_features``)."""
    ids, mask = _stack_rows(_concat_rows(p, c), _concat_rows(p, r))
    feats = pooled_features(transformers_base(backbone), ids, mask, "last")
    b = p[0].shape[0]
    return feats[:b], feats[b:]


@dataclass(frozen=True)
class PackedBatch:
    """One ``[prompt | chosen | rejected]`` row per pair, right-padded to width ``W``.

    ``input_ids (B, W)`` int64; ``position_ids (B, W)`` int64 (0 on padding); ``segment (B, W)``
    int64: 0 prompt, 1 chosen, 2 rejected, 3 padding; ``allowed (B, W, W)`` bool, query × key;
    ``chosen_last`` / ``rejected_last (B,)``: the column of each response's last token."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    allowed: torch.Tensor
    chosen_last: torch.Tensor
    rejected_last: torch.Tensor

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, W, W)`` in ``dtype``: :func:`additive_mask` of ``allowed``."""
        return additive_mask(self.allowed, dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, W, W)`` in ``dtype`` from a query × key mask ``allowed (B, W, W)``: 0 where
    attended, the dtype's lowest finite value elsewhere (finite, so a softmax over a row never
    divides 0 by 0)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min).unsqueeze(1)


def pack_pairs(p: tuple[torch.Tensor, torch.Tensor], c: tuple[torch.Tensor, torch.Tensor],
               r: tuple[torch.Tensor, torch.Tensor]) -> PackedBatch:
    """Lay out validated ``(input_ids, bool mask)`` segments (any padding side, interior padding
    allowed) as :class:`PackedBatch` rows; see the module docstring for the layout."""
    (pi, pm), (ci, cm), (ri, rm) = (pack_left(*s) for s in (p, c, r))
    lp, lc, lr = pm.sum(-1, keepdim=True), cm.sum(-1, keepdim=True), rm.sum(-1, keepdim=True)
    width = int((lp + lc + lr).max())
    j = torch.arange(width, device=ci.device).expand(ci.shape[0], width)
    segment = torch.where(j < lp, 0, torch.where(j < lp + lc, 1, torch.where(j < lp + lc + lr, 2, 3)))

    def take(ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == 0:  # an all-empty prompt batch: no column to read (never selected)
            return torch.zeros_like(at)
        return ids.gather(1, at.clamp(0, ids.shape[1] - 1))

    input_ids = torch.where(segment == 0, take(pi, j), torch.where(segment == 1, take(ci, j - lp),
                            torch.where(segment == 2, take(ri, j - lp - lc), 0)))
    # both responses continue the prompt's positions: the rejected one skips the chosen columns
    position_ids = torch.where(segment == 3, 0, torch.where(segment == 2, j - lc, j))
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=ci.device).tril()
    allowed = causal & (q != 3) & ((k == 0) | (k == q))
    # a padding query sees itself only: a fully masked row is NaN in eager attention, and NaN
    # in a key's value would reach valid queries through 0·NaN in the next layer
    allowed |= torch.eye(width, dtype=torch.bool, device=ci.device) & (q == 3)
    return PackedBatch(input_ids, position_ids, segment, allowed,
                       (lp + lc - 1).squeeze(1), (lp + lc + lr - 1).squeeze(1))


def _compute_dtype(base: nn.Module) -> torch.dtype:
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else next(base.parameters()).dtype
    if torch.is_autocast_enabled(weight.device.type if isinstance(weight, torch.Tensor) else "cpu"):
        dtype = torch.get_autocast_dtype(weight.device.type)
    return dtype


def _run_masked(backbone: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                allowed: torch.Tensor) -> torch.Tensor:
    """The base model's hidden states ``(B, W, H)`` of packed rows under the query × key mask
    ``allowed (B, W, W)``."""
    base = transformers_base(backbone)
    # sdpa takes the bool mask as it is (True = attend; 1 byte per entry, as transformers' own
    # masks); eager attention adds the mask to the scores, so it gets the additive float form
    if base.config._attn_implementation == "sdpa":
        mask = allowed.unsqueeze(1)
    else:
        mask = additive_mask(allowed, _compute_dtype(base))
    kwargs: dict[str, object] = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
    if _accepts(base, "use_cache"):
        kwargs["use_cache"] = False  # nothing is generated; a cache would only cost memory
    out = base(**kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
        got = shape_str(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"backbone must return hidden states (B, W, H) with (B, W) = {shape_str(input_ids.shape)}, got {got}")
    return hidden


def _packed(backbone: nn.Module, p, c, r) -> tuple[torch.Tensor, torch.Tensor]:
    batch = pack_pairs(p, c, r)
    hidden = _run_masked(backbone, batch.input_ids, batch.position_ids, batch.allowed)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch.chosen_last], hidden[rows, batch.rejected_last]


@dataclass(frozen=True)
class PackedTexts:
    """Whole texts packed several to a row, padding-free: ``input_ids``, ``position_ids`` (each
    text from 0) and ``segment`` (the text's index, −1 on padding) ``(R, W)`` int64; ``allowed
    (R, W, W)`` bool (causal within a text, nothing across texts; a pad query sees itself);
    ``row`` / ``last`` ``(N,)``: the row and column of text ``n``'s last token."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    allowed: torch.Tensor
    row: torch.Tensor
    last: torch.Tensor


def _first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of capacity ``width``, first fit in decreasing length."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(width - lengths[i])
    return bins


PACK_WIDTHS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # candidate row widths, × the longest text


def text_pack_width(lengths: list[int], attention_per_token: float) -> int:
    """The row width for :func:`pack_texts` that minimises the estimated cost of a forward,
    ``rows · W · (1 + a · W)``: ``rows · W`` token slots in the linear layers, ``rows · W²``
    query–key pairs in the (dense, block-masked) attention, weighted by ``a`` = attention FLOPs
    per pair ÷ linear FLOPs per token (:func:`attention_per_token`). Candidates are
    :data:`PACK_WIDTHS` × the longest text whose masks hold at most twice the query–key pairs of
    one text per row, so wide rows cannot blow up the mask's memory."""
    longest = max(lengths)
    budget = 2 * len(lengths) * longest * longest
    best, best_cost = longest, float("inf")
    for m in PACK_WIDTHS:
        w = math.ceil(m * longest)
        rows = len(_first_fit(lengths, w))
        if rows * w * w > budget and w != longest:
            continue
        cost = rows * w * (1.0 + attention_per_token * w)
        if cost < best_cost:
            best, best_cost = w, cost
    return best


def attention_per_token(config: object) -> float:
    """Attention FLOPs per query–key pair (``4H``: scores and values) ÷ linear FLOPs per token
    (``2(4H² + 3HI)``: q, k, v, o and a gated MLP) of a decoder layer with hidden size ``H`` and
    MLP width ``I`` (``intermediate_size``, else ``4H``): ``2 / (4H + 3I)``."""
    h = int(getattr(config, "hidden_size"))
    i = int(getattr(config, "intermediate_size", None) or 4 * h)
    return 2.0 / (4 * h + 3 * i)


def pack_texts(rows: list[list[int]], device: torch.device | str | None = None, width: int | None = None) -> PackedTexts:
    """Pack token-id lists (each non-empty) into rows of ``width`` (default and at least: the
    longest text), first fit in decreasing length, so the linear layers see about ``Σ len`` token
    slots instead of ``N · max len`` (a length-grouped batch of rated texts whose lengths spread
    2× still pads ~25%; :func:`text_pack_width` picks a width)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pack_texts: every text needs at least one token")
    width = max(max(len(r) for r in rows), width or 0)
    bins = _first_fit([len(r) for r in rows], width)
    ids = torch.zeros(len(bins), width, dtype=torch.long)
    pos = torch.zeros(len(bins), width, dtype=torch.long)
    seg = torch.full((len(bins), width), -1, dtype=torch.long)
    row = torch.zeros(len(rows), dtype=torch.long)
    last = torch.zeros(len(rows), dtype=torch.long)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(rows[i])
            ids[b, at:at + n] = torch.tensor(rows[i], dtype=torch.long)
            pos[b, at:at + n] = torch.arange(n)
            seg[b, at:at + n] = i
            row[i], last[i] = b, at + n - 1
            at += n
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (q == k) & (q >= 0)
    allowed |= torch.eye(width, dtype=torch.bool) & (q < 0)  # a pad query sees itself (no NaN row)
    return PackedTexts(*(t.to(device) for t in (ids, pos, seg, allowed, row, last)))


def packed_text_features(backbone: nn.Module, packed: PackedTexts) -> torch.Tensor:
    """Last-token features ``(N, H)`` of the texts in ``packed`` (:func:`pack_texts`): equal to
    :func:`prefcore.models.pooling.pooled_features` of each text alone up to floating-point
    rounding, with gradients; the backbone must take a custom 4-D mask (:func:`resolve_packing`)."""
    hidden = _run_masked(backbone, packed.input_ids, packed.position_ids, packed.allowed)
    return hidden[packed.row, packed.last]


def pair_features(backbone: nn.Module, prompt, chosen, rejected, *, packing: str = "auto") -> PairFeatures:
    """Last-token features of ``prompt + chosen`` and ``prompt + rejected``, ``(B, H)`` each.

    ``prompt``, ``chosen``, ``rejected``: padded batches of ``B`` rows (any padding side), each a
    mapping with ``input_ids (B, T_s)`` and ``attention_mask (B, T_s)`` (bool or 0/1; a
    tokenizer's ``BatchEncoding`` works) or an ``(input_ids, attention_mask)`` tuple. Every
    response row needs at least one token; a prompt row may be empty. ``packing``: ``"packed"``
    (the prompt encoded once, see the module docstring), ``"plain"`` (the two sequences, as
    ``pooled_features`` runs them) or ``"auto"`` (:func:`resolve_packing`). The LM head never
    runs. Both modes give the same features up to floating-point rounding, with gradients."""
    p, c, r = _segment(prompt, "prompt"), _segment(chosen, "chosen"), _segment(rejected, "rejected")
    sizes = {"prompt": p[0].shape[0], "chosen": c[0].shape[0], "rejected": r[0].shape[0]}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"prompt, chosen and rejected must hold the same number of rows, got {sizes}")
    devices = {s[0].device for s in (p, c, r)}
    param = next(iter(backbone.parameters()), None)
    if len(devices) != 1 or (param is not None and param.device not in devices):
        raise ValueError(f"prompt, chosen and rejected must be on the backbone's device "
                         f"({None if param is None else param.device}), got {sorted(map(str, devices))}")
    mode = resolve_packing(packing, backbone).mode
    ch, rj = (_packed if mode == "packed" else _plain)(backbone, p, c, r)
    return PairFeatures(ch, rj, mode)
