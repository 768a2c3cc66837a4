r"""Simulated annotator populations with known ground truth (DESIGN §4 ``prefcore.data.synthetic``).

Two worlds, each seeded only by the ``torch.Generator`` you pass (no global RNG, no state):

(a) The 1-D world of the density-estimation paper (Dumoulin et al.):
    :func:`toy_preference_density` is eq. (10),
    ``p*(x) = 2/5·N_trunc(−2.5, σ=0.25) + 3/5·N_trunc(2.5, σ=1.0)`` on ``[−10, 10]`` (the paper writes
    σ, so 0.25 and 1.0 are *standard deviations*; each component is truncated to the interval and
    renormalised there). :func:`sample_luce_pairs` draws uniform pairs labelled by the Luce choice
    rule (eq. 9); :func:`sample_annotator_mixture_pairs` labels each pair by one of the two
    single-mode annotators of eq. (21) instead.

(b) A ratings world (:func:`make_ratings_world`): items = (prompt, response) feature vectors; a
    pool of annotators of known *types*, each type scoring a response by a known function of
    its features plus Gaussian noise, clipped to ``[−1, 1]``; N annotators per item; several
    attributes; a contentious region that the majority mildly likes and a minority strongly
    dislikes. :func:`sample_vote_pairs` draws response pairs with n binary votes each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from prefcore.distributions import ndtr

__all__ = [
    "TruncatedNormalMixture",
    "toy_preference_density",
    "toy_annotator_densities",
    "LucePairs",
    "MixturePairs",
    "luce_preference_probability",
    "sample_luce_pairs",
    "sample_annotator_mixture_pairs",
    "IndexPairs",
    "sample_pbde_pairs",
    "ScoreMixture",
    "RatingsWorldConfig",
    "AnnotatorType",
    "RatingsWorld",
    "VotePairs",
    "default_annotator_types",
    "make_ratings_world",
    "sample_vote_pairs",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _require_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (seed it with torch.Generator().manual_seed(s)), got {type(generator).__name__}")
    return generator


def _require_count(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value



# =========================================================================================
# (a) the 1-D world of the density-estimation paper
# =========================================================================================

@dataclass(frozen=True)
class TruncatedNormalMixture:
    r"""Mixture of normals, each truncated to ``[low, high]`` and renormalised there:

    .. math:: p(x) = \sum_k w_k\,\frac{\phi((x-\mu_k)/\sigma_k)/\sigma_k}{\Phi((h-\mu_k)/\sigma_k) - \Phi((l-\mu_k)/\sigma_k)}\,1[l \le x \le h]

    ``weights``, ``means``, ``stds``: ``(K,)`` float64, weights sum to 1, stds > 0.
    """

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    low: float = -10.0
    high: float = 10.0

    def __post_init__(self) -> None:
        k = self.weights.shape
        if self.weights.dim() != 1 or self.means.shape != k or self.stds.shape != k:
            raise ValueError(f"weights, means and stds must all have shape (K,), got {tuple(self.weights.shape)}, {tuple(self.means.shape)}, {tuple(self.stds.shape)}")
        if not bool((self.stds > 0).all()) or not bool((self.weights > 0).all()):
            raise ValueError(f"weights and stds must be > 0, got weights {self.weights.tolist()}, stds {self.stds.tolist()}")
        if abs(float(self.weights.sum()) - 1.0) > 1e-9:
            raise ValueError(f"weights must sum to 1, got {float(self.weights.sum())}")
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got [{self.low}, {self.high}]")

    def _log_mass(self) -> torch.Tensor:
        hi = ndtr((self.high - self.means) / self.stds)
        lo = ndtr((self.low - self.means) / self.stds)
        return torch.log(hi - lo)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_k(x)`` of each truncated component, ``x (*,)`` → ``(*, K)`` float64 (−inf outside)."""
        x = torch.as_tensor(x, dtype=torch.float64)[..., None]
        z = (x - self.means) / self.stds
        lp = -0.5 * z * z - torch.log(self.stds) - _LOG_SQRT_2PI - self._log_mass()
        inside = (x >= self.low) & (x <= self.high)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)``, ``x (*,)`` → ``(*,)`` float64; stable far from the modes (logsumexp)."""
        return torch.logsumexp(self.component_log_prob(x) + torch.log(self.weights), dim=-1)

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        """``p(x)``, ``(*,)`` float64."""
        return self.log_prob(x).exp()

    def mode(self) -> float:
        """Location of the global maximum of ``p`` (a fine grid search over ``[low, high]``)."""
        grid = torch.linspace(self.low, self.high, 200_001, dtype=torch.float64)
        return float(grid[self.log_prob(grid).argmax()])


def toy_preference_density() -> TruncatedNormalMixture:
    """The implicit preference distribution of density-estimation eq. (10):
    ``2/5·N_trunc(μ=−2.5, σ=0.25) + 3/5·N_trunc(μ=2.5, σ=1.0)`` on ``[−10, 10]`` (σ = std dev)."""
    return TruncatedNormalMixture(
        weights=torch.tensor([0.4, 0.6], dtype=torch.float64),
        means=torch.tensor([-2.5, 2.5], dtype=torch.float64),
        stds=torch.tensor([0.25, 1.0], dtype=torch.float64),
    )


def toy_annotator_densities() -> tuple[torch.Tensor, tuple[TruncatedNormalMixture, TruncatedNormalMixture]]:
    """The two annotators of eq. (21): weights ``(2,) = (2/5, 3/5)`` and their implicit preference
    distributions ``p*_1 = N_trunc(−2.5, 0.25)`` ("iced coffee"), ``p*_2 = N_trunc(2.5, 1.0)`` ("hot")."""
    mix = toy_preference_density()
    one = torch.ones(1, dtype=torch.float64)
    annotators = tuple(
        TruncatedNormalMixture(one, mix.means[k : k + 1], mix.stds[k : k + 1], mix.low, mix.high) for k in range(2)
    )
    return mix.weights.clone(), annotators  # type: ignore[return-value]


def luce_preference_probability(density: TruncatedNormalMixture, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    r"""Luce choice rule (eq. 9): :math:`P(a\succ b) = p(a)/(p(a)+p(b)) = \sigma(\log p(a) - \log p(b))`,
    float64, computed from log-densities so it is exact even where both densities underflow."""
    return torch.sigmoid(density.log_prob(x_a) - density.log_prob(x_b))


class LucePairs(NamedTuple):
    """Pairs labelled by one Luce annotator. All ``(n,)``; ``labels`` bool (True = ``x_a`` preferred);
    ``prob_a`` the true :math:`P(a\\succ b)` the label was drawn from. ``x_*`` float32."""

    x_a: torch.Tensor
    x_b: torch.Tensor
    labels: torch.Tensor
    prob_a: torch.Tensor


class MixturePairs(NamedTuple):
    """Pairs labelled by a latent annotator (eq. 21): like :class:`LucePairs` plus ``annotator``
    ``(n,)`` int64, the (normally hidden) id of the annotator who labelled each pair;
    ``prob_a`` is the population probability :math:`\\sum_k w_k P_k(a\\succ b)`."""

    x_a: torch.Tensor
    x_b: torch.Tensor
    labels: torch.Tensor
    prob_a: torch.Tensor
    annotator: torch.Tensor


def _uniform_pairs(n: int, low: float, high: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(2, n, generator=generator, dtype=torch.float64) * (high - low) + low
    # Round to the float32 that is returned first, so the probabilities (computed in float64)
    # are exactly those of the returned points.
    x = x.float().clamp(low, high).double()
    return x[0], x[1]


def sample_luce_pairs(
    n: int,
    generator: torch.Generator,
    density: TruncatedNormalMixture | None = None,
) -> LucePairs:
    """``n`` pairs drawn uniformly on ``[low, high]²`` of ``density`` (default: eq. 10), each
    labelled ``y ~ Bernoulli(p(a)/(p(a)+p(b)))`` (eq. 9). Deterministic given ``generator``."""
    n = _require_count(n, "n")
    generator = _require_generator(generator)
    density = toy_preference_density() if density is None else density
    x_a, x_b = _uniform_pairs(n, density.low, density.high, generator)
    prob = luce_preference_probability(density, x_a, x_b)
    labels = torch.rand(n, generator=generator, dtype=torch.float64) < prob
    return LucePairs(x_a.float(), x_b.float(), labels, prob)


def sample_annotator_mixture_pairs(
    n: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    annotators: tuple[TruncatedNormalMixture, ...] | None = None,
) -> MixturePairs:
    r"""``n`` uniform pairs, each labelled by annotator ``k ~ Cat(weights)`` with its own Luce rule
    (eq. 21): :math:`P(a\succ b) = \sum_k w_k\,p_k(a)/(p_k(a)+p_k(b))`. Defaults: the two
    annotators of :func:`toy_annotator_densities`. Deterministic given ``generator``."""
    n = _require_count(n, "n")
    generator = _require_generator(generator)
    if (weights is None) != (annotators is None):
        raise ValueError("weights and annotators must be given together (or neither)")
    if weights is None:
        weights, annotators = toy_annotator_densities()
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (len(annotators),) or not bool((weights > 0).all()) or abs(float(weights.sum()) - 1) > 1e-9:
        raise ValueError(f"weights must be positive, sum to 1 and have shape (K,) = ({len(annotators)},), got {weights.tolist()}")
    low, high = annotators[0].low, annotators[0].high
    x_a, x_b = _uniform_pairs(n, low, high, generator)
    who = torch.multinomial(weights, n, replacement=True, generator=generator) if n else torch.zeros(0, dtype=torch.long)
    per_annotator = torch.stack([luce_preference_probability(d, x_a, x_b) for d in annotators], dim=-1)  # (n, K)
    own = per_annotator.gather(1, who[:, None])[:, 0]
    labels = torch.rand(n, generator=generator, dtype=torch.float64) < own
    return MixturePairs(x_a.float(), x_b.float(), labels, per_annotator @ weights, who)


class IndexPairs(NamedTuple):
    """Pairs of items of a finite set, by index. All ``(n,)``: ``a``, ``b`` int64 item indices,
    ``labels`` bool (True = ``a`` preferred), ``prob_a`` float64 the true :math:`P(a\\succ b)`."""

    a: torch.Tensor
    b: torch.Tensor
    labels: torch.Tensor
    prob_a: torch.Tensor


def sample_pbde_pairs(
    log_p: torch.Tensor,
    n: int,
    generator: torch.Generator,
    *,
    f: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
) -> IndexPairs:
    r"""A PBDE annotator (density-estimation eq. 11) over a finite item set (e.g. sequences).

    ``log_p (X,)``: the annotator's implicit log-preference of each item (need not be normalised);
    ``f (X,) > 0`` (default 1) and ``g (X,)`` (default 0) define
    :math:`\Omega(x) = f(x)\log p(x) + g(x)`. ``n`` pairs ``(a, b)`` are drawn uniformly (with
    replacement, ``a = b`` allowed) and labelled ``y ~ Bernoulli(σ(Ω(a) − Ω(b)))``. ``f = 1, g = 0``
    is the Luce rule (eq. 9); ``f = 1/|x|`` the length-normalised Luce rule (eq. 12).
    Deterministic given ``generator``."""
    n = _require_count(n, "n")
    generator = _require_generator(generator)
    if not isinstance(log_p, torch.Tensor) or log_p.dim() != 1 or log_p.shape[0] < 1 or not log_p.is_floating_point():
        raise ValueError(f"log_p must be a floating tensor of shape (X,) with X >= 1, got {getattr(log_p, 'shape', type(log_p).__name__)}")
    lp = log_p.detach().double()
    if not bool(torch.isfinite(lp).all()):
        raise ValueError("log_p must be finite (every item needs a finite log-preference)")
    omega = lp
    if f is not None:
        if not isinstance(f, torch.Tensor) or f.shape != lp.shape or not bool((f > 0).all()):
            raise ValueError(f"f must be a tensor of shape (X,) = ({lp.shape[0]},) with every value > 0")
        omega = f.double() * omega
    if g is not None:
        if not isinstance(g, torch.Tensor) or g.shape != lp.shape:
            raise ValueError(f"g must be a tensor of shape (X,) = ({lp.shape[0]},)")
        omega = omega + g.double()
    idx = torch.randint(0, lp.shape[0], (2, n), generator=generator)
    prob = torch.sigmoid(omega[idx[0]] - omega[idx[1]])
    labels = torch.rand(n, generator=generator, dtype=torch.float64) < prob
    return IndexPairs(idx[0], idx[1], labels, prob)


# =========================================================================================
# (b) the ratings world
# =========================================================================================

class ScoreMixture(NamedTuple):
    r"""Ground-truth distribution of one rating of each item *before clipping*: a Gaussian
    mixture over annotator types, each field ``(B, T)``: ``weights`` (rows sum to 1), ``means``,
    ``stds``. The observed rating is that draw clipped to ``[−1, 1]``, so its CDF equals the
    mixture CDF on ``(−1, 1)`` with the mass outside moved onto ±1. ``log(weights), means,
    log(stds)`` are the ``(logits, mu, log_sigma)`` of ``prefcore.distributions.GaussianMixture``."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    def gmm_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, mu, log_sigma)``, each ``(B, T)``: the field order of
        ``prefcore.distributions.GaussianMixture``, so ``GaussianMixture(*mix.gmm_params())`` works."""
        return torch.log(self.weights), self.means, torch.log(self.stds)


@dataclass(frozen=True)
class AnnotatorType:
    r"""One annotator type: its share of the population, its rating noise (std), and the
    coefficients of its rating means. For a prompt ``p (D_p,)`` and response ``z (D_r,)`` the
    mean rating of attribute ``a`` (``a = 0`` is the overall score, ``1..M`` the attributes) is

    .. math:: \mu_a = \tanh\big(b_a + u_a\cdot z + v_a\,(p_0 z_1) + c_a\,\kappa(z)\big),\qquad
              \kappa(z) = \sigma(4(z_2 - 1))

    — ``u`` weighs the response features (``z_0`` quality, ``z_1`` verbosity, ``z_2`` edginess,
    the rest distractors), ``v`` how much the prompt's wish for detail (``p_0``) rewards verbosity,
    and ``c`` the reaction to the contentious region (``κ ≈ 1`` for edgy responses ``z_2 ≳ 1.5``).
    ``bias, u, v, c`` have one row per attribute: shapes ``(1+M,)``, ``(1+M, D_r)``, ``(1+M,)``, ``(1+M,)``.
    """

    name: str
    proportion: float
    noise_std: float
    bias: tuple[float, ...]
    u: tuple[tuple[float, ...], ...]
    v: tuple[float, ...]
    c: tuple[float, ...]


ATTRIBUTE_NAMES = ("helpfulness", "safety")
_EDGE_SHIFT = 0.35  # mean of the edginess feature z_2 ~ N(0.35, 1): ~24% of responses have z_2 > 1


def default_annotator_types(response_dim: int = 6) -> tuple[AnnotatorType, ...]:
    """Three types over (overall, helpfulness, safety) with ``response_dim >= 3`` response features:

    - ``pragmatist`` (50%): likes quality, mildly likes edgy answers (+0.5 on κ);
    - ``enthusiast`` (30%): likes quality and edginess a bit more (+0.7), dislikes verbosity;
    - ``cautious`` (20%): likes quality but strongly dislikes edgy answers (−3 on κ → ≈ −0.95).

    In the contentious region (``z_2 > 1``) the mean overall rating is positive (≈ +0.18, vs
    ≈ +0.04 elsewhere) while ~21% of ratings (the cautious fifth) sit near −0.95, below the
    catastrophic threshold −0.7: a mean-reward model likes these responses, a lower-quantile
    or CRR-aware one does not.
    """
    if response_dim < 3:
        raise ValueError(f"response_dim must be >= 3 (quality, verbosity, edginess), got {response_dim}")

    def u(q: float, verb: float, edge: float) -> tuple[float, ...]:
        return (q, verb, edge) + (0.0,) * (response_dim - 3)

    return (
        AnnotatorType("pragmatist", 0.5, 0.12, bias=(0.1, 0.1, 0.6),
                      u=(u(0.6, 0.0, 0.0), u(0.7, 0.1, 0.0), u(0.1, 0.0, -0.1)),
                      v=(0.3, 0.4, 0.0), c=(0.5, 0.4, -0.3)),
        AnnotatorType("enthusiast", 0.3, 0.15, bias=(0.15, 0.1, 0.5),
                      u=(u(0.5, -0.2, 0.1), u(0.6, -0.1, 0.1), u(0.0, 0.0, 0.0)),
                      v=(0.2, 0.3, 0.0), c=(0.7, 0.6, -0.2)),
        AnnotatorType("cautious", 0.2, 0.10, bias=(0.05, 0.0, 0.7),
                      u=(u(0.5, 0.0, -0.1), u(0.5, 0.0, -0.1), u(0.0, 0.0, -0.2)),
                      v=(0.2, 0.2, 0.0), c=(-3.0, -2.5, -3.0)),
    )


@dataclass(frozen=True)
class RatingsWorldConfig:
    """Sizes of a ratings world. ``num_annotators`` = N rating slots per item; items get between
    ``min_annotators`` and N valid ratings. ``pool_size`` annotators exist, with type counts
    ``round(proportion·pool_size)``; each item is rated by distinct annotators drawn uniformly
    from the pool, so every rating's type is marginally ``Cat(count/pool_size)`` exactly."""

    num_items: int = 512
    num_annotators: int = 10
    min_annotators: int = 7
    prompt_dim: int = 4
    response_dim: int = 6
    pool_size: int = 100
    num_prompts: int | None = None  # distinct prompts (items share them); None = one per item

    def __post_init__(self) -> None:
        _require_count(self.num_items, "num_items")
        _require_count(self.num_annotators, "num_annotators", 1)
        _require_count(self.min_annotators, "min_annotators", 1)
        if self.min_annotators > self.num_annotators:
            raise ValueError(f"min_annotators must be <= num_annotators ({self.num_annotators}), got {self.min_annotators}")
        _require_count(self.prompt_dim, "prompt_dim", 1)
        _require_count(self.response_dim, "response_dim", 3)
        _require_count(self.pool_size, "pool_size", 1)
        if self.pool_size < self.num_annotators:
            raise ValueError(f"pool_size must be >= num_annotators ({self.num_annotators}), got {self.pool_size}")
        if self.num_prompts is not None:
            _require_count(self.num_prompts, "num_prompts", 1)


def _type_tensors(types: tuple[AnnotatorType, ...], response_dim: int) -> dict[str, torch.Tensor]:
    m1 = len(types[0].bias)
    for t in types:
        if len(t.bias) != m1 or len(t.v) != m1 or len(t.c) != m1 or len(t.u) != m1 or any(len(r) != response_dim for r in t.u):
            raise ValueError(f"annotator type {t.name!r} must have bias/v/c of length 1+M = {m1} and u of shape ({m1}, {response_dim})")
        if not t.noise_std > 0 or not t.proportion > 0:
            raise ValueError(f"annotator type {t.name!r} needs proportion > 0 and noise_std > 0, got {t.proportion}, {t.noise_std}")
    f64 = dict(dtype=torch.float64)
    return dict(
        bias=torch.tensor([t.bias for t in types], **f64),   # (T, A)
        u=torch.tensor([t.u for t in types], **f64),         # (T, A, D_r)
        v=torch.tensor([t.v for t in types], **f64),         # (T, A)
        c=torch.tensor([t.c for t in types], **f64),         # (T, A)
        noise=torch.tensor([t.noise_std for t in types], **f64),  # (T,)
    )


def _contentiousness(response: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(4.0 * (response[..., 2] - 1.0))


def _type_means(params: dict[str, torch.Tensor], prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Mean rating per item, type and attribute, ``(B, T, A)`` float64 (A = 1 + M)."""
    p = prompt.double()
    z = response.double()
    lin = torch.einsum("bd,tad->bta", z, params["u"])
    detail = (p[:, 0] * z[:, 1])[:, None, None] * params["v"][None]
    edgy = _contentiousness(z)[:, None, None] * params["c"][None]
    return torch.tanh(params["bias"][None] + lin + detail + edgy)


def _clipped_mixture_cdf(mix: ScoreMixture, x: torch.Tensor) -> torch.Tensor:
    """CDF of a mixture draw clipped to [−1, 1] at points ``x (B, G)`` or ``(G,)`` → ``(B, G)``."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() == 1:
        x = x.expand(mix.means.shape[0], -1)
    z = (x[:, :, None] - mix.means[:, None, :]) / mix.stds[:, None, :]
    cdf = (ndtr(z) * mix.weights[:, None, :]).sum(-1)
    cdf = torch.where(x < -1.0, torch.zeros_like(cdf), cdf)
    return torch.where(x >= 1.0, torch.ones_like(cdf), cdf)


def _clipped_normal_mean(mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    r""":math:`E[\mathrm{clip}(X, -1, 1)]`, :math:`X\sim N(\mu, \sigma^2)` (closed form)."""
    a = (-1.0 - mu) / sd
    b = (1.0 - mu) / sd
    pdf = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    fa, fb = ndtr(a), ndtr(b)
    return -fa + (1.0 - fb) + mu * (fb - fa) + sd * (pdf(a) - pdf(b))


@dataclass(frozen=True)
class RatingsWorld:
    r"""A generated ratings data set with its ground truth. ``B`` items, ``N`` rating slots,
    ``M`` attributes, ``T`` annotator types.

    - ``prompt_features (B, D_p)``, ``response_features (B, D_r)`` float32; ``features`` is their
      concatenation ``(B, D_p + D_r)``; ``prompt_ids (B,)`` int64 (items may share a prompt).
    - ``scores (B, N)`` float32 overall ratings in ``[−1, 1]`` (0 where masked); ``mask (B, N)`` bool.
    - ``attribute_scores (B, M, N)`` float32: the same annotators' per-attribute ratings
      (``attribute_names``), same mask.
    - ``annotator_ids (B, N)`` int64 (−1 where masked) into the pool; ``annotator_types (B, N)``
      int64 type index (−1 where masked); ``pool_types (P,)`` the type of each pool member.
    - ``type_names``, ``type_proportions (T,)`` float64 (exact shares of the pool, sum to 1).
    - ``contentious (B,)`` bool: responses in the contentious region (κ(z) > 0.5, i.e. z_2 > 1).

    Ground truth (float64): :meth:`true_score_mixture`, :meth:`true_cdf`, :meth:`true_mean`,
    :meth:`true_quantile`, :meth:`true_catastrophic_rate`.
    """

    prompt_features: torch.Tensor
    response_features: torch.Tensor
    prompt_ids: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor
    attribute_scores: torch.Tensor
    annotator_ids: torch.Tensor
    annotator_types: torch.Tensor
    pool_types: torch.Tensor
    type_names: tuple[str, ...]
    type_proportions: torch.Tensor
    attribute_names: tuple[str, ...]
    types: tuple[AnnotatorType, ...]

    @property
    def features(self) -> torch.Tensor:
        """``(B, D_p + D_r)``: prompt features then response features."""
        return torch.cat([self.prompt_features, self.response_features], dim=-1)

    @property
    def contentious(self) -> torch.Tensor:
        return _contentiousness(self.response_features.double()) > 0.5

    def _attribute_index(self, attribute: str | None) -> int:
        if attribute is None or attribute == "overall":
            return 0
        if attribute not in self.attribute_names:
            raise ValueError(f"attribute must be None, 'overall' or one of {self.attribute_names}, got {attribute!r}")
        return 1 + self.attribute_names.index(attribute)

    def true_score_mixture(self, attribute: str | None = None) -> ScoreMixture:
        """Per-item mixture over types of the (unclipped) rating of ``attribute`` (None = overall)."""
        a = self._attribute_index(attribute)
        params = _type_tensors(self.types, self.response_features.shape[1])
        means = _type_means(params, self.prompt_features, self.response_features)[:, :, a]
        b = means.shape[0]
        return ScoreMixture(self.type_proportions.double().expand(b, -1).clone(), means, params["noise"].expand(b, -1).clone())

    def true_cdf(self, x: torch.Tensor, attribute: str | None = None) -> torch.Tensor:
        """``P(rating ≤ x)`` of one rating (clipping included), ``x (G,)`` or ``(B, G)`` → ``(B, G)``."""
        return _clipped_mixture_cdf(self.true_score_mixture(attribute), x)

    def true_mean(self, attribute: str | None = None) -> torch.Tensor:
        """Expected rating per item ``(B,)`` (clipping included, closed form)."""
        mix = self.true_score_mixture(attribute)
        return (mix.weights * _clipped_normal_mean(mix.means, mix.stds)).sum(-1)

    def true_quantile(self, levels: torch.Tensor, attribute: str | None = None, iters: int = 60) -> torch.Tensor:
        """Quantiles of one rating, ``levels (L,)`` in (0, 1) → ``(B, L)``, by bisection on
        :meth:`true_cdf` over ``[−1, 1]`` (the smallest x with CDF(x) ≥ level)."""
        levels = torch.as_tensor(levels, dtype=torch.float64)
        if levels.dim() != 1 or not bool(((levels > 0) & (levels < 1)).all()):
            raise ValueError(f"levels must be a 1-D tensor of values strictly inside (0, 1), got {levels.tolist()}")
        mix = self.true_score_mixture(attribute)
        b = mix.means.shape[0]
        lo = torch.full((b, levels.shape[0]), -1.0, dtype=torch.float64)
        hi = torch.ones_like(lo)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = _clipped_mixture_cdf(mix, mid) < levels
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return hi

    def true_catastrophic_rate(self, threshold: float = -0.7, attribute: str | None = None) -> torch.Tensor:
        """Probability that one rating is below ``threshold`` (DFL's catastrophic −0.7), ``(B,)``.
        The chance that any of n independent raters is below it is ``1 − (1 − this)^n``."""
        x = torch.full((1,), float(threshold), dtype=torch.float64)
        mix = self.true_score_mixture(attribute)
        z = (x[None, :, None] - mix.means[:, None, :]) / mix.stds[:, None, :]
        below = (ndtr(z) * mix.weights[:, None, :]).sum(-1)[:, 0]
        if threshold <= -1.0:
            return torch.zeros_like(below)
        return below if threshold <= 1.0 else torch.ones_like(below)

    def to_records(self) -> list[dict[str, Any]]:
        """Each item as a ratings-schema dict ``{prompt, response, scores, annotator_ids}`` with
        short synthetic text that names the features (so a record can be traced back), the valid
        scores as floats and the annotator ids as strings ``"annotator-<pool index>"``."""
        records = []
        for i in range(self.scores.shape[0]):
            valid = self.mask[i]
            records.append({
                "prompt": _prompt_text(int(self.prompt_ids[i]), self.prompt_features[i]),
                "response": _response_text(i, self.response_features[i]),
                "scores": [float(s) for s in self.scores[i][valid].tolist()],
                "annotator_ids": [f"annotator-{int(a)}" for a in self.annotator_ids[i][valid].tolist()],
            })
        return records


def _prompt_text(prompt_id: int, p: torch.Tensor) -> str:
    detail = "in detail" if float(p[0]) > 0 else "briefly"
    return f"Prompt {prompt_id}: please explain topic {prompt_id % 17} {detail}."


def _response_text(item: int, z: torch.Tensor) -> str:
    quality = "careful" if float(z[0]) > 0 else "sloppy"
    length = "long" if float(z[1]) > 0 else "short"
    tone = " It takes an edgy, provocative angle." if float(z[2]) > 1.0 else ""
    return f"Response {item}: a {quality}, {length} answer.{tone}"


def make_ratings_world(
    generator: torch.Generator,
    config: RatingsWorldConfig | None = None,
    types: tuple[AnnotatorType, ...] | None = None,
) -> RatingsWorld:
    """Generate a :class:`RatingsWorld`. Prompt and response features are standard normal
    (response ``z_2`` shifted so ~1/4 of responses fall in the contentious region); each item
    gets ``n_b ∈ [min_annotators, N]`` distinct pool annotators (the first ``n_b`` slots valid);
    each rating is ``clip(μ_{type,attr}(p, z) + noise_std_type·ε, −1, 1)`` with ε ~ N(0, 1)
    independent per rating and attribute. Deterministic given ``generator``."""
    generator = _require_generator(generator)
    cfg = RatingsWorldConfig() if config is None else config
    types = default_annotator_types(cfg.response_dim) if types is None else tuple(types)
    if not types:
        raise ValueError("types must contain at least one AnnotatorType")
    params = _type_tensors(types, cfg.response_dim)
    b, n = cfg.num_items, cfg.num_annotators
    num_attr = params["bias"].shape[1] - 1
    attribute_names = ATTRIBUTE_NAMES if num_attr == len(ATTRIBUTE_NAMES) else tuple(f"attribute_{m}" for m in range(num_attr))

    # Pool with exact type counts (largest-remainder rounding of proportion · pool_size).
    props = torch.tensor([t.proportion for t in types], dtype=torch.float64)
    props = props / props.sum()
    raw = props * cfg.pool_size
    counts = raw.floor().long()
    short = cfg.pool_size - int(counts.sum())
    if short:
        counts[torch.argsort(raw - counts, descending=True)[:short]] += 1
    if bool((counts == 0).any()):
        raise ValueError(f"pool_size {cfg.pool_size} is too small: some annotator type gets no member (counts {counts.tolist()})")
    pool_types = torch.repeat_interleave(torch.arange(len(types)), counts)

    n_prompts = b if cfg.num_prompts is None else cfg.num_prompts
    prompt_table = torch.randn(n_prompts, cfg.prompt_dim, generator=generator)
    prompt_ids = torch.randint(0, n_prompts, (b,), generator=generator) if cfg.num_prompts is not None else torch.arange(b)
    prompt = prompt_table[prompt_ids]
    response = torch.randn(b, cfg.response_dim, generator=generator)
    response[:, 2] += _EDGE_SHIFT

    # Distinct annotators per item: the first n columns of a random permutation of the pool.
    perm = torch.argsort(torch.rand(b, cfg.pool_size, generator=generator), dim=1)[:, :n]
    n_valid = torch.randint(cfg.min_annotators, n + 1, (b,), generator=generator)
    mask = torch.arange(n)[None, :] < n_valid[:, None]
    who_type = pool_types[perm]  # (B, N)

    means = _type_means(params, prompt, response)  # (B, T, A)
    slot_means = means.gather(1, who_type[:, :, None].expand(-1, -1, means.shape[2]))  # (B, N, A)
    eps = torch.randn(b, n, means.shape[2], generator=generator, dtype=torch.float64)
    ratings = (slot_means + params["noise"][who_type][:, :, None] * eps).clamp(-1.0, 1.0)
    ratings = torch.where(mask[:, :, None], ratings, torch.zeros_like(ratings)).float()

    return RatingsWorld(
        prompt_features=prompt,
        response_features=response,
        prompt_ids=prompt_ids,
        scores=ratings[:, :, 0].contiguous(),
        mask=mask,
        attribute_scores=ratings[:, :, 1:].permute(0, 2, 1).contiguous(),
        annotator_ids=torch.where(mask, perm, torch.full_like(perm, -1)),
        annotator_types=torch.where(mask, who_type, torch.full_like(who_type, -1)),
        pool_types=pool_types,
        type_names=tuple(t.name for t in types),
        type_proportions=counts.double() / cfg.pool_size,
        attribute_names=attribute_names,
        types=types,
    )


@dataclass(frozen=True)
class VotePairs:
    r"""Response pairs to one prompt, each judged by ``n`` voters. ``B`` pairs.

    - ``prompt_features (B, D_p)``, ``response_a``, ``response_b (B, D_r)`` float32;
      ``prompt_ids (B,)`` int64, the world's prompt id (same prompt text as the world's records).
    - ``votes (B, n)`` int64 0/1: 1 = the voter preferred ``a`` (voter = a distinct random pool
      member who rates both responses with fresh noise, unclipped, and picks the higher).
    - ``label (B,)`` bool: a single extra annotator's judgment (True = ``a``), the "binary
      preference" a standard data set stores (its voter is distinct from the ``n`` voters).
    - ``prob_a (B,)`` float64: the population's true aggregate preference
      :math:`\sum_t w_t\,\Phi\big((\mu_t(a) - \mu_t(b))/(\sigma_t\sqrt2)\big)` (overall score).
    """

    prompt_features: torch.Tensor
    response_a: torch.Tensor
    response_b: torch.Tensor
    votes: torch.Tensor
    label: torch.Tensor
    prob_a: torch.Tensor
    prompt_ids: torch.Tensor

    @property
    def vote_fraction(self) -> torch.Tensor:
        """Observed fraction of voters preferring ``a``, ``(B,)`` float32."""
        return self.votes.float().mean(-1)

    def to_records(self) -> list[dict[str, Any]]:
        """Pairs-schema dicts ``{prompt, chosen, rejected, votes}``; ``votes`` are re-coded so that
        1 = preferred the *chosen* response (chosen = ``label``'s pick)."""
        out = []
        for i in range(self.votes.shape[0]):
            a_first = bool(self.label[i])
            text_a = _response_text(2 * i, self.response_a[i])
            text_b = _response_text(2 * i + 1, self.response_b[i])
            v = self.votes[i] if a_first else 1 - self.votes[i]
            out.append({
                "prompt": _prompt_text(int(self.prompt_ids[i]), self.prompt_features[i]),
                "chosen": text_a if a_first else text_b,
                "rejected": text_b if a_first else text_a,
                "votes": [int(x) for x in v.tolist()],
            })
        return out


def sample_vote_pairs(
    world: RatingsWorld,
    num_pairs: int,
    num_votes: int,
    generator: torch.Generator,
) -> VotePairs:
    """``num_pairs`` fresh response pairs (new standard-normal response features, a prompt drawn
    from the world's items' prompts) judged on the overall score by ``num_votes`` distinct pool
    voters plus one labeller. Deterministic given ``generator``."""
    num_pairs = _require_count(num_pairs, "num_pairs")
    num_votes = _require_count(num_votes, "num_votes", 1)
    generator = _require_generator(generator)
    pool = world.pool_types.shape[0]
    if num_votes + 1 > pool:
        raise ValueError(f"num_votes must be < pool size ({pool}) (voters and the labeller are distinct), got {num_votes}")
    params = _type_tensors(world.types, world.response_features.shape[1])
    src = torch.randint(0, world.prompt_features.shape[0], (num_pairs,), generator=generator)
    prompt = world.prompt_features[src]
    d_r = world.response_features.shape[1]
    resp = torch.randn(2, num_pairs, d_r, generator=generator)
    resp[:, :, 2] += _EDGE_SHIFT
    mu_a = _type_means(params, prompt, resp[0])[:, :, 0]  # (B, T)
    mu_b = _type_means(params, prompt, resp[1])[:, :, 0]
    noise = params["noise"]
    perm = torch.argsort(torch.rand(num_pairs, pool, generator=generator), dim=1)[:, : num_votes + 1]
    who = world.pool_types[perm]  # (B, n+1)
    eps = torch.randn(2, num_pairs, num_votes + 1, generator=generator, dtype=torch.float64)
    s_a = mu_a.gather(1, who) + noise[who] * eps[0]
    s_b = mu_b.gather(1, who) + noise[who] * eps[1]
    prefer_a = s_a > s_b
    w = world.type_proportions.double()
    prob_a = (w * ndtr((mu_a - mu_b) / (noise * math.sqrt(2.0)))).sum(-1)
    return VotePairs(prompt, resp[0], resp[1], prefer_a[:, 1:].long(), prefer_a[:, 0], prob_a, world.prompt_ids[src])
