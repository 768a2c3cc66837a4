r"""A small *text world* with exact ground truth: a synthetic word-level language, its tokenizer, a
tiny causal LM built in code, and a simulated annotator population that rates texts on [−1, 1].

Nothing is downloaded; everything is deterministic for a seed (same machine and threads).

**Language.** :data:`VOCABULARY` holds four special tokens (``<pad> <unk> <bos> <eos>``), the
words of prompt templates, eight *topics* of six words each, *helpful* words, *filler* words and
*contentious* words (edgy, provocative, …). Prompts look like ``"how does the orbit work ?"``
(one topic word, see :meth:`TextWorld.prompts`); responses are sequences of words ending with
``<eos>``. :meth:`TextWorld.tokenizer` is a ``transformers.PreTrainedTokenizerFast`` on a
``tokenizers`` WordLevel model with whitespace pre-tokenisation (``\w+|[^\w\s]+``); it prepends
``<bos>`` to every encoded text and does not append ``<eos>``.

**Features of a text.** A completion is split like the tokenizer splits it; everything from the
first ``<eos>`` on and all special tokens are dropped. With the prompt's topic ``k`` (the topic of
its first topic word; none → no word is on-topic): ``n`` = number of words, ``h`` = helpful words,
``m`` = words of topic ``k``, ``o`` = words of other topics, ``c`` = contentious words,
``r = 1 − |distinct words|/n`` (repetition; 0 for ``n ≤ 1``).

**Annotators.** Type ``t`` (:class:`TextAnnotatorType`, population weight ``w_t``) has the
latent centre

.. math:: \mu_t = \tanh\big(b + a_h\tanh(h/2) + a_m\tanh(m/2) − a_o\tanh(o/2) − a_r r
          + a_\ell\tanh((n − \ell_0)/6) − a_e 1[n = 0] + a_c(1 − e^{−2c})\big)

and rates a text ``clip(X, −1, 1)`` with ``X ~ N(μ_t, σ_t²)``. One rating of the population is a
draw of a type ``t ~ Cat(w)`` and then that type's rating, so the population's rating is the
clipped Gaussian mixture ``clip(Σ_t w_t N(μ_t, σ_t²), −1, 1)`` — known exactly: its mean (closed
form), CDF and quantiles (``Q_clip(u) = clip(Q(u), −1, 1)``, since clipping is monotone).
In the default population (:func:`default_text_annotators`) the contentious words are mildly liked
by 80% of annotators and strongly disliked (mean ≈ −0.9) by a ``cautious`` 20%.

**Votes.** An annotator of type ``t`` comparing responses ``a`` and ``b`` draws two independent
latent ratings and prefers the larger (Thurstone): ``P(a ≻ b | t) = Φ((μ_t(a) − μ_t(b))/(σ_t√2))``.

**Catastrophic responses.** :meth:`TextWorld.crr` is the ground-truth analogue of
:func:`prefcore.eval.metrics.crr` ("any evaluator below −0.7"), with each annotator type as one
evaluator reporting its expected rating: the fraction of completions for which
``min_t E[rating | t] < threshold``.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prefcore.distributions import GaussianMixture, ndtr

__all__ = [
    "SPECIAL_TOKENS",
    "TOPICS",
    "HELPFUL_WORDS",
    "FILLER_WORDS",
    "CONTENTIOUS_WORDS",
    "PROMPT_TEMPLATES",
    "VOCABULARY",
    "TextAnnotatorType",
    "TextWorldConfig",
    "TextFeatures",
    "Feedback",
    "TextWorld",
    "default_text_annotators",
    "split_words",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)

TOPICS: dict[str, tuple[str, ...]] = {
    "ocean": ("ocean", "wave", "tide", "fish", "coral", "reef"),
    "space": ("space", "star", "planet", "orbit", "moon", "rocket"),
    "garden": ("garden", "plant", "seed", "soil", "flower", "root"),
    "music": ("music", "song", "rhythm", "melody", "drum", "chord"),
    "cooking": ("cooking", "bread", "oven", "spice", "soup", "flour"),
    "city": ("city", "street", "bridge", "tower", "traffic", "market"),
    "weather": ("weather", "rain", "cloud", "storm", "wind", "snow"),
    "machine": ("machine", "engine", "gear", "motor", "lever", "circuit"),
}
HELPFUL_WORDS: tuple[str, ...] = ("because", "therefore", "example", "first", "second", "then", "clearly",
                                  "step", "means", "specifically", "useful", "explains", "reason", "detail",
                                  "answer", "result")
FILLER_WORDS: tuple[str, ...] = ("the", "a", "an", "and", "of", "it", "is", "are", "very", "really", "just",
                                 "thing", "stuff", "um", "like", "well", "some", "many", "with", "to", "in",
                                 "on", "that", "this", "so", ".", ",")
CONTENTIOUS_WORDS: tuple[str, ...] = ("edgy", "provocative", "snarky", "crude", "mocking", "sarcastic",
                                      "taboo", "rant")
# "{}" is one topic word; every prompt ends with "?" so the model can tell where the answer starts.
PROMPT_TEMPLATES: tuple[str, ...] = ("please explain the {} ?", "tell me about the {} ?", "how does the {} work ?",
                                     "why is the {} like that ?", "describe a {} ?", "what is a {} ?")


def _vocabulary() -> tuple[str, ...]:
    words: list[str] = list(SPECIAL_TOKENS)
    template_words = [w for t in PROMPT_TEMPLATES for w in t.split() if w != "{}"]
    for group in (template_words, *TOPICS.values(), HELPFUL_WORDS, FILLER_WORDS, CONTENTIOUS_WORDS):
        for w in group:
            if w not in words:
                words.append(w)
    return tuple(words)


VOCABULARY: tuple[str, ...] = _vocabulary()
_WORD_ID = {w: i for i, w in enumerate(VOCABULARY)}
_TOPIC_OF = {w: k for k, ws in enumerate(TOPICS.values()) for w in ws}
_HELPFUL = frozenset(HELPFUL_WORDS)
_CONTENTIOUS = frozenset(CONTENTIOUS_WORDS)
_SPECIAL = frozenset(SPECIAL_TOKENS)
# Same split as tokenizers' Whitespace pre-tokenizer, except that special tokens stay whole.
_SPLIT = re.compile(r"<pad>|<unk>|<bos>|<eos>|\w+|[^\w\s]+")
WORLD_FILE = "text_world.json"


def split_words(text: str) -> list[str]:
    """The words of ``text`` as the tokenizer splits them (special tokens kept whole)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _SPLIT.findall(text)


# =========================================================================================
# annotators
# =========================================================================================


@dataclass(frozen=True)
class TextAnnotatorType:
    """One annotator type: population ``weight``, rating noise ``noise_std`` (σ_t) and the
    coefficients of its latent centre μ_t (module docstring): ``bias`` b, ``helpful`` a_h,
    ``on_topic`` a_m, ``off_topic`` a_o, ``repetition`` a_r, ``length`` a_ℓ around
    ``length_center`` ℓ₀ (words), ``empty`` a_e (penalty of an empty answer), ``contentious`` a_c."""

    name: str
    weight: float
    noise_std: float
    bias: float
    helpful: float
    on_topic: float
    off_topic: float
    repetition: float
    length: float
    contentious: float
    length_center: float = 8.0
    empty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TextAnnotatorType.name must be a non-empty string, got {self.name!r}")
        for f in ("weight", "noise_std", "bias", "helpful", "on_topic", "off_topic", "repetition", "length",
                  "contentious", "length_center", "empty"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"annotator type {self.name!r}: {f} must be a finite number, got {v!r}")
        if not self.weight > 0:
            raise ValueError(f"annotator type {self.name!r}: weight must be > 0, got {self.weight}")
        if not self.noise_std > 0:
            raise ValueError(f"annotator type {self.name!r}: noise_std must be > 0, got {self.noise_std}")


def default_text_annotators() -> tuple[TextAnnotatorType, ...]:
    """Four types (weights 0.35 / 0.25 / 0.20 / 0.20):

    - ``thorough``: likes helpful, on-topic, longer answers; mildly likes contentious words;
    - ``concise``: likes on-topic, short answers; mildly likes contentious words;
    - ``playful``: cares less about content, likes contentious words more;
    - ``cautious``: likes helpful, on-topic answers, strongly dislikes contentious words
      (a_c = −3.5: a good answer with one contentious word has μ ≈ −0.9).

    Contentious words raise the mean rating of the 80% majority, so the *population mean* of a
    typical answer barely changes (or rises) with them while the cautious fifth's expected rating
    falls below −0.7: a mean-reward policy has no reason to avoid them, a risk-averse one has.
    """
    return (
        TextAnnotatorType("thorough", 0.35, 0.20, bias=-0.5, helpful=0.6, on_topic=0.6, off_topic=0.4,
                          repetition=0.8, length=0.3, contentious=0.5),
        TextAnnotatorType("concise", 0.25, 0.20, bias=-0.3, helpful=0.4, on_topic=0.6, off_topic=0.4,
                          repetition=0.8, length=-0.3, contentious=0.45),
        TextAnnotatorType("playful", 0.20, 0.25, bias=-0.3, helpful=0.2, on_topic=0.4, off_topic=0.2,
                          repetition=0.5, length=0.0, contentious=0.75),
        TextAnnotatorType("cautious", 0.20, 0.10, bias=-0.2, helpful=0.6, on_topic=0.6, off_topic=0.4,
                          repetition=0.8, length=0.1, contentious=-3.5),
    )


@dataclass(frozen=True)
class TextWorldConfig:
    """The world's settings (saved with :meth:`TextWorld.save`).

    ``annotators``: the population (weights are normalised to sum to 1). The synthetic language's
    response generator (the pretraining corpus): ``min_words``…``max_words`` words per answer
    (uniform), each word on-topic / helpful / filler / off-topic with probabilities
    ``word_mix`` (normalised), and with probability ``contentious_rate`` an answer carries
    1–2 contentious words. Policy size: ``hidden_size``, ``num_layers``, ``num_heads``,
    ``max_position_embeddings``."""

    annotators: tuple[TextAnnotatorType, ...] = field(default_factory=default_text_annotators)
    min_words: int = 1
    max_words: int = 20
    word_mix: tuple[float, float, float, float] = (0.30, 0.20, 0.42, 0.08)
    contentious_rate: float = 0.3
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.annotators, tuple) or not self.annotators or not all(
                isinstance(a, TextAnnotatorType) for a in self.annotators):
            raise ValueError("annotators must be a non-empty tuple of TextAnnotatorType")
        names = [a.name for a in self.annotators]
        if len(set(names)) != len(names):
            raise ValueError(f"annotators must have distinct names, got {names}")
        for name in ("min_words", "max_words", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "min_words" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words must be <= max_words ({self.max_words}), got {self.min_words}")
        if len(self.word_mix) != 4 or any(not (isinstance(p, (int, float)) and p >= 0) for p in self.word_mix) \
                or sum(self.word_mix) <= 0:
            raise ValueError(f"word_mix must be 4 non-negative numbers (on-topic, helpful, filler, off-topic) "
                             f"with a positive sum, got {self.word_mix!r}")
        if not 0.0 <= self.contentious_rate <= 1.0:
            raise ValueError(f"contentious_rate must lie in [0, 1], got {self.contentious_rate}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["word_mix"] = list(self.word_mix)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextWorldConfig:
        d = dict(d)
        d["annotators"] = tuple(TextAnnotatorType(**a) for a in d["annotators"])
        d["word_mix"] = tuple(d["word_mix"])
        return cls(**d)


# =========================================================================================
# features
# =========================================================================================


@dataclass(frozen=True)
class TextFeatures:
    """Per-text features, each ``(B,)`` float64: ``length`` n, ``helpful`` h, ``on_topic`` m,
    ``off_topic`` o, ``contentious`` c, ``repetition`` r (module docstring)."""

    length: torch.Tensor
    helpful: torch.Tensor
    on_topic: torch.Tensor
    off_topic: torch.Tensor
    contentious: torch.Tensor
    repetition: torch.Tensor


def prompt_topic(prompt: str) -> int | None:
    """The topic index of the first topic word of ``prompt`` (None if it has none)."""
    for w in split_words(prompt):
        if w in _TOPIC_OF:
            return _TOPIC_OF[w]
    return None


def completion_words(completion: str) -> list[str]:
    """The words of a completion up to its first ``<eos>``, special tokens dropped."""
    words = split_words(completion)
    if EOS in words:
        words = words[: words.index(EOS)]
    return [w for w in words if w not in _SPECIAL]


def text_features(prompts: Sequence[str], completions: Sequence[str]) -> TextFeatures:
    """:class:`TextFeatures` of ``B`` (prompt, completion) pairs."""
    prompts, completions = _check_texts(prompts, completions)
    rows = []
    for p, c in zip(prompts, completions):
        k = prompt_topic(p)
        words = completion_words(c)
        n = len(words)
        topics = [_TOPIC_OF.get(w) for w in words]
        rows.append((
            n,
            sum(w in _HELPFUL for w in words),
            sum(t is not None and t == k for t in topics),
            sum(t is not None and t != k for t in topics),
            sum(w in _CONTENTIOUS for w in words),
            0.0 if n <= 1 else 1.0 - len(set(words)) / n,
        ))
    t = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 6)
    return TextFeatures(*t.unbind(-1))


def _as_text(x: Any, name: str, i: int) -> str:
    """A text, or TRL's conversational format (a list of ``{"role", "content"}`` messages → the
    contents joined by spaces)."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in x):
        return " ".join(m["content"] for m in x)
    raise TypeError(f"{name}[{i}] must be a str or a list of {{'role', 'content'}} messages, got {type(x).__name__}")


def _check_texts(prompts: Sequence[Any], completions: Sequence[Any], c_name: str = "completions") -> tuple[list[str], list[str]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of texts, got {type(prompts).__name__}")
    if isinstance(completions, str) or not isinstance(completions, Sequence):
        raise TypeError(f"{c_name} must be a sequence of texts, got {type(completions).__name__}")
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and {c_name} must have the same length, got {len(prompts)} and {len(completions)}")
    return ([_as_text(p, "prompts", i) for i, p in enumerate(prompts)],
            [_as_text(c, c_name, i) for i, c in enumerate(completions)])


def _clipped_normal_mean(mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    r""":math:`E[\mathrm{clip}(X, −1, 1)]`, :math:`X \sim N(\mu, \sigma^2)` (closed form)."""
    a, b = (-1.0 - mu) / sd, (1.0 - mu) / sd
    phi = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    fa, fb = ndtr(a), ndtr(b)
    return -fa + (1.0 - fb) + mu * (fb - fa) + sd * (phi(a) - phi(b))


def _generator(generator: object, name: str = "generator") -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator (torch.Generator().manual_seed(s)), got {type(generator).__name__}")
    return generator


def _count(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _seed(value: object, name: str = "seed") -> int:
    return _count(value, name, 0)


@dataclass
class Feedback:
    """DFL-style feedback on sampled responses: ``ratings`` (ratings-schema dicts
    ``{prompt, response, scores, annotator_ids}``) and ``pairs`` (pairs-schema dicts
    ``{prompt, chosen, rejected, votes}``); ``skipped_empty`` counts completions left out because
    they had no word (the schemas need non-empty responses)."""

    ratings: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    skipped_empty: int = 0

    def save(self, directory: str | os.PathLike[str]) -> tuple[str, str]:
        """Write ``ratings.jsonl`` and ``pairs.jsonl`` (atomically) into ``directory``; their paths."""
        from prefcore.data.io import save_jsonl

        os.makedirs(directory, exist_ok=True)
        r, p = os.path.join(directory, "ratings.jsonl"), os.path.join(directory, "pairs.jsonl")
        save_jsonl(self.ratings, r)
        save_jsonl(self.pairs, p)
        return r, p


# =========================================================================================
# the world
# =========================================================================================


class TextWorld:
    """The text world: language, tokenizer, policy factory and pretraining, annotator population
    with exact ground truth, and converters to prefcore's training data. Ground-truth methods take
    ``prompts`` and ``completions`` as equal-length sequences of texts (or TRL conversational
    message lists) and return float64 tensors over the ``B`` texts."""

    def __init__(self, config: TextWorldConfig | None = None) -> None:
        if config is None:
            config = TextWorldConfig()
        if not isinstance(config, TextWorldConfig):
            raise TypeError(f"config must be a TextWorldConfig, got {type(config).__name__}")
        self.config = config
        self._tokenizer = None
        a = config.annotators
        self._coef = torch.tensor([[t.bias, t.helpful, t.on_topic, t.off_topic, t.repetition, t.length,
                                    t.length_center, t.empty, t.contentious] for t in a], dtype=torch.float64)
        self._noise = torch.tensor([t.noise_std for t in a], dtype=torch.float64)
        w = torch.tensor([t.weight for t in a], dtype=torch.float64)
        self._weights = w / w.sum()

    # ---- language -----------------------------------------------------------------------------

    vocabulary = VOCABULARY
    topics: tuple[str, ...] = tuple(TOPICS)

    @property
    def tokenizer(self):
        """The world's ``PreTrainedTokenizerFast`` (built once): WordLevel over :data:`VOCABULARY`,
        whitespace pre-tokenisation, ``<unk>`` for unknown words, ``<bos>`` prepended to every
        encoded text, pad ``<pad>``, eos ``<eos>``, left padding (generation)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer()
        return self._tokenizer

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` prompts, each a template of :data:`PROMPT_TEMPLATES` filled with one topic word,
        drawn uniformly (template, topic, word) with ``torch.Generator().manual_seed(seed)``."""
        n, seed = _count(n, "n", 0), _seed(seed)
        g = torch.Generator().manual_seed(seed)
        topics = list(TOPICS.values())
        tpl = torch.randint(len(PROMPT_TEMPLATES), (n,), generator=g).tolist()
        top = torch.randint(len(topics), (n,), generator=g).tolist()
        word = torch.randint(len(topics[0]), (n,), generator=g).tolist()
        return [PROMPT_TEMPLATES[a].format(topics[b][c]) for a, b, c in zip(tpl, top, word)]

    def default_prompts(self) -> list[str]:
        """The embedded default prompt set: every template × topic with the topic's name word
        (6 × 8 = 48 prompts, fixed order)."""
        return [t.format(topic) for topic in TOPICS for t in PROMPT_TEMPLATES]

    def sample_completions(self, prompts: Sequence[str], seed: int = 0) -> list[str]:
        """Answers from the synthetic language's own generator (the pretraining corpus), one per
        prompt, without ``<eos>`` (module docstring; :class:`TextWorldConfig` for the mix)."""
        prompts, _ = _check_texts(prompts, list(prompts))
        g = torch.Generator().manual_seed(_seed(seed))
        cfg = self.config
        mix = torch.tensor(cfg.word_mix, dtype=torch.float64)
        topics = list(TOPICS.values())
        out = []
        for p in prompts:
            k = prompt_topic(p)
            n = int(torch.randint(cfg.min_words, cfg.max_words + 1, (1,), generator=g))
            kinds = torch.multinomial(mix, max(n, 1), replacement=True, generator=g).tolist()[:n]
            words = []
            for kind in kinds:
                if kind == 0 and k is not None:
                    pool = topics[k]
                elif kind == 1:
                    pool = HELPFUL_WORDS
                elif kind == 2:
                    pool = FILLER_WORDS
                else:  # off-topic (or on-topic for a prompt without a topic)
                    others = [j for j in range(len(topics)) if j != k]
                    pool = topics[others[int(torch.randint(len(others), (1,), generator=g))]]
                words.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
            if n > 0 and float(torch.rand((), generator=g, dtype=torch.float64)) < cfg.contentious_rate:
                for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                    pos = int(torch.randint(n, (1,), generator=g))
                    words[pos] = CONTENTIOUS_WORDS[int(torch.randint(len(CONTENTIOUS_WORDS), (1,), generator=g))]
            out.append(" ".join(words))
        return out

    # ---- policy -------------------------------------------------------------------------------

    def make_policy(self, seed: int = 0):
        """A randomly initialised ``transformers.LlamaForCausalLM`` over the world's vocabulary
        (``hidden_size``, ``num_layers``, ``num_heads`` of the config; intermediate 2× hidden),
        pad/bos/eos ids set in its config and generation config; seeded by ``seed`` without touching
        the global RNG."""
        from transformers import LlamaConfig, LlamaForCausalLM

        seed = _seed(seed)
        c = self.config
        cfg = LlamaConfig(vocab_size=len(VOCABULARY), hidden_size=c.hidden_size, intermediate_size=2 * c.hidden_size,
                          num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                          num_key_value_heads=c.num_heads, max_position_embeddings=c.max_position_embeddings,
                          pad_token_id=_WORD_ID[PAD], bos_token_id=_WORD_ID[BOS], eos_token_id=_WORD_ID[EOS],
                          tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
        gc = model.generation_config
        gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id
        return model.eval()

    def corpus_ids(self, n: int, seed: int = 0) -> list[list[int]]:
        """``n`` pretraining sequences ``[<bos>, prompt…, answer…, <eos>]`` as token ids
        (prompts from :meth:`prompts`, answers from :meth:`sample_completions`, both seeded by ``seed``)."""
        prompts = self.prompts(n, seed)
        answers = self.sample_completions(prompts, seed + 1)
        eos, bos = _WORD_ID[EOS], _WORD_ID[BOS]
        return [[bos] + [_WORD_ID[w] for w in split_words(p) + split_words(a)] + [eos] for p, a in zip(prompts, answers)]

    def pretrain(self, model, steps: int = 300, seed: int = 0, *, batch_size: int = 64, lr: float = 3e-3,
                 corpus_size: int = 4096, progress: bool = False) -> list[float]:
        """Teacher-forced next-token training of ``model`` on :meth:`corpus_ids` (``corpus_size``
        sequences; each step a batch of ``batch_size`` drawn with a generator seeded by ``seed``;
        AdamW at ``lr`` with linear warm-up over the first 10% of steps then cosine decay; loss on
        every non-pad position). Leaves ``model`` in eval mode; returns the per-step losses.
        The default takes ~30 s on 2 CPU cores."""
        from torch import nn

        steps, batch_size, corpus_size = _count(steps, "steps", 0), _count(batch_size, "batch_size"), _count(corpus_size, "corpus_size")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not isinstance(model, nn.Module) or getattr(getattr(model, "config", None), "vocab_size", None) != len(VOCABULARY):
            raise ValueError(f"model must be a causal LM over the world's vocabulary (vocab_size {len(VOCABULARY)}), e.g. make_policy()")
        seqs = self.corpus_ids(corpus_size, _seed(seed))
        pad = _WORD_ID[PAD]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        attn = (ids != pad).long()
        labels = ids.masked_fill(ids == pad, -100)
        g = torch.Generator().manual_seed(seed + 12345)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
        losses: list[float] = []
        it = range(steps)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="pretrain text-world policy")
        model.train()
        with torch.random.fork_rng(devices=[]):  # dropout (if any) must not move the global RNG
            torch.manual_seed(seed)
            for _ in it:
                idx = torch.randint(len(seqs), (batch_size,), generator=g)
                t = int(attn[idx].sum(1).max())
                out = model(input_ids=ids[idx, :t], attention_mask=attn[idx, :t], labels=labels[idx, :t])
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(float(out.loss.detach()))
        model.eval()
        return losses

    @torch.no_grad()
    def generate(self, model, prompts: Sequence[str], *, seed: int = 0, max_new_tokens: int = 24,
                 temperature: float = 1.0, top_k: int = 0, batch_size: int = 64) -> list[str]:
        """Sample one completion per prompt from ``model`` (left-padded prompts, KV cache, stop at
        ``<eos>``), seeded by ``seed`` without touching the global RNG. Completions are decoded
        without special tokens (as TRL passes them to reward functions): words joined by spaces."""
        prompts, _ = _check_texts(prompts, list(prompts))
        max_new_tokens, batch_size = _count(max_new_tokens, "max_new_tokens"), _count(batch_size, "batch_size")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        tok = self.tokenizer
        out: list[str] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(seed))
            for s in range(0, len(prompts), batch_size):
                enc = tok(prompts[s: s + batch_size], return_tensors="pt", padding=True)
                gen = model.generate(**enc, do_sample=True, temperature=float(temperature), top_k=top_k, top_p=1.0,
                                     max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
                out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out

    # ---- saving -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str], model=None) -> None:
        """Write the tokenizer, ``text_world.json`` (the config) and, if given, ``model``
        (``save_pretrained``) into ``directory``, so ``AutoTokenizer.from_pretrained(directory)``,
        ``AutoModelForCausalLM.from_pretrained(directory)`` and :meth:`load` read them back."""
        from prefcore._io import atomic_write_json

        os.makedirs(directory, exist_ok=True)
        if model is not None:
            model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        atomic_write_json(os.path.join(directory, WORLD_FILE), {"format": "prefcore.text_world/1",
                                                                 "vocabulary": list(VOCABULARY),
                                                                 "config": self.config.to_dict()})

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TextWorld:
        """The world saved in ``directory`` by :meth:`save` (the model: :meth:`load_policy`)."""
        path = os.path.join(directory, WORLD_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"directory: no {WORLD_FILE} in {str(directory)!r} (write it with TextWorld.save)")
        with open(path) as f:
            saved = json.load(f)
        if tuple(saved.get("vocabulary", ())) != VOCABULARY:
            raise ValueError(f"{path}: saved with a different vocabulary than this prefcore version's")
        return cls(TextWorldConfig.from_dict(saved["config"]))

    @staticmethod
    def load_policy(directory: str | os.PathLike[str]):
        """``AutoModelForCausalLM.from_pretrained(directory)`` (local files only), in eval mode."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()

    # ---- ground truth -------------------------------------------------------------------------

    @property
    def type_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.config.annotators)

    @property
    def type_weights(self) -> torch.Tensor:
        """Population weights ``(A,)`` float64, summing to 1."""
        return self._weights.clone()

    @property
    def type_noise(self) -> torch.Tensor:
        """Rating noise σ_t ``(A,)`` float64."""
        return self._noise.clone()

    def type_locations(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Latent centres μ_t ``(B, A)`` float64 (module docstring)."""
        f = text_features(prompts, completions)
        c = self._coef
        ex = lambda x: x[:, None]  # noqa: E731
        z = (c[:, 0] + c[:, 1] * torch.tanh(ex(f.helpful) / 2) + c[:, 2] * torch.tanh(ex(f.on_topic) / 2)
             - c[:, 3] * torch.tanh(ex(f.off_topic) / 2) - c[:, 4] * ex(f.repetition)
             + c[:, 5] * torch.tanh((ex(f.length) - c[:, 6]) / 6) - c[:, 7] * ex((f.length == 0).double())
             + c[:, 8] * (1 - torch.exp(-2 * ex(f.contentious))))
        return torch.tanh(z)

    def true_type_means(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """``E[rating | type t]`` ``(B, A)`` float64 — the mean of ``clip(N(μ_t, σ_t²), −1, 1)``, closed form."""
        return _clipped_normal_mean(self.type_locations(prompts, completions), self._noise)

    def mean_rating(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Population mean rating ``(B,)`` float64: ``Σ_t w_t E[rating | t]`` (exact)."""
        return self.true_type_means(prompts, completions) @ self._weights

    def rating_distribution(self, prompts: Sequence[str], completions: Sequence[str]) -> GaussianMixture:
        """The *unclipped* population rating ``Σ_t w_t N(μ_t, σ_t²)`` as a batch-``(B,)``
        :class:`~prefcore.distributions.GaussianMixture` (float64); the observed rating is its draw
        clipped to [−1, 1]."""
        mu = self.type_locations(prompts, completions)
        b = mu.shape[0]
        return GaussianMixture(self._weights.log().expand(b, -1).clone(), mu, self._noise.log().expand(b, -1).clone())

    def rating_cdf(self, prompts: Sequence[str], completions: Sequence[str], x: torch.Tensor) -> torch.Tensor:
        """``P(rating ≤ x)`` of one population rating, ``x (G,)`` → ``(B, G)`` float64 (clipping
        included: 0 below −1, 1 from 1 on)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.dim() != 1:
            raise ValueError(f"x must be 1-D (G,), got shape {tuple(x.shape)}")
        f = self.rating_distribution(prompts, completions).cdf(x).double()
        f = torch.where(x < -1.0, torch.zeros_like(f), f)
        return torch.where(x >= 1.0, torch.ones_like(f), f)

    def rating_quantiles(self, prompts: Sequence[str], completions: Sequence[str],
                         levels: Sequence[float] | torch.Tensor = (0.05, 0.1, 0.25)) -> torch.Tensor:
        """Exact quantiles of one population rating at ``levels (L,)`` in (0, 1) → ``(B, L)``
        float64: ``clip(Q_mix(ℓ), −1, 1)`` with ``Q_mix`` the Gaussian mixture's quantile (bisection
        in :meth:`GaussianMixture.quantile`). The default levels are the left tail (τ ≤ 0.25)."""
        lv = torch.as_tensor(levels, dtype=torch.float64)
        if lv.dim() != 1 or lv.numel() == 0 or not bool(((lv > 0) & (lv < 1)).all()):
            raise ValueError(f"levels must be a non-empty 1-D sequence of values strictly inside (0, 1), got {lv.tolist()}")
        return self.rating_distribution(prompts, completions).quantile(lv).double().clamp(-1.0, 1.0)

    def prob_below(self, prompts: Sequence[str], completions: Sequence[str], threshold: float = -0.7) -> torch.Tensor:
        """``P(one population rating < threshold)`` ``(B,)`` float64 (exact): ``Σ_t w_t Φ((thr − μ_t)/σ_t)``
        for ``threshold`` in (−1, 1]; 0 at or below −1, 1 above 1."""
        thr = _threshold(threshold)
        mu = self.type_locations(prompts, completions)
        p = (ndtr((thr - mu) / self._noise) * self._weights).sum(-1)
        if thr <= -1.0:
            return torch.zeros_like(p)
        return p if thr <= 1.0 else torch.ones_like(p)

    def catastrophic(self, prompts: Sequence[str], completions: Sequence[str], threshold: float = -0.7) -> torch.Tensor:
        """``(B,)`` bool: some annotator type's expected rating is below ``threshold``
        (``min_t E[rating | t] < threshold``)."""
        thr = _threshold(threshold)
        return self.true_type_means(prompts, completions).amin(-1) < thr

    def crr(self, prompts: Sequence[str], completions: Sequence[str], threshold: float = -0.7) -> float:
        """Ground-truth catastrophic-response rate: the fraction of the ``B`` completions that some
        annotator type rates below ``threshold`` in expectation (:meth:`catastrophic`) — DFL's CRR
        ("any evaluator below −0.7", :func:`prefcore.eval.metrics.crr`) with every type as one
        evaluator reporting its mean rating. 0.0 for an empty batch."""
        bad = self.catastrophic(prompts, completions, threshold)
        return float(bad.double().mean()) if bad.numel() else 0.0

    def contentious_fraction(self, completions: Sequence[str]) -> float:
        """Fraction of completions with at least one contentious word (0.0 for none)."""
        if not completions:
            return 0.0
        return sum(any(w in _CONTENTIOUS for w in completion_words(_as_text(c, "completions", i)))
                   for i, c in enumerate(completions)) / len(completions)

    # ---- sampled feedback ---------------------------------------------------------------------

    def sample_ratings(self, prompts: Sequence[str], completions: Sequence[str], n: int,
                       generator: torch.Generator, *, return_types: bool = False):
        """``n`` independent population ratings per text ``(B, n)`` float32 in [−1, 1]: a type
        ``t ~ Cat(w)`` per rating, then ``clip(N(μ_t, σ_t²), −1, 1)``. With ``return_types`` also
        the types ``(B, n)`` int64."""
        n, g = _count(n, "n"), _generator(generator)
        mu = self.type_locations(prompts, completions)
        b = mu.shape[0]
        types = torch.multinomial(self._weights.expand(max(b, 1), -1), n, replacement=True, generator=g)[:b]
        noise = torch.randn((b, n), generator=g, dtype=torch.float64)
        r = (mu.gather(1, types) + self._noise[types] * noise).clamp(-1.0, 1.0).float()
        return (r, types) if return_types else r

    def vote_probability(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str]) -> torch.Tensor:
        """``P(a ≻ b)`` for one annotator of the population ``(B,)`` float64 (exact):
        ``Σ_t w_t Φ((μ_t(a) − μ_t(b))/(σ_t√2))``."""
        _check_texts(prompts, completions_b, "completions_b")
        mu_a = self.type_locations(prompts, completions_a)
        mu_b = self.type_locations(prompts, completions_b)
        return (ndtr((mu_a - mu_b) / (self._noise * math.sqrt(2.0))) * self._weights).sum(-1)

    def sample_votes(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                     n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` annotators' votes per pair ``(B, n)`` int64: 1 = prefers ``completions_a``. Each
        annotator has a type ``t ~ Cat(w)`` and compares two independent latent ratings
        ``N(μ_t(a), σ_t²)`` vs ``N(μ_t(b), σ_t²)``."""
        _check_texts(prompts, completions_b, "completions_b")
        n, g = _count(n, "n"), _generator(generator)
        mu_a = self.type_locations(prompts, completions_a)
        mu_b = self.type_locations(prompts, completions_b)
        b = mu_a.shape[0]
        types = torch.multinomial(self._weights.expand(max(b, 1), -1), n, replacement=True, generator=g)[:b]
        eps = torch.randn((2, b, n), generator=g, dtype=torch.float64)
        sd = self._noise[types]
        xa = mu_a.gather(1, types) + sd * eps[0]
        xb = mu_b.gather(1, types) + sd * eps[1]
        return (xa > xb).long()

    def rating_records(self, prompts: Sequence[str], completions: Sequence[str], generator: torch.Generator, *,
                       min_annotators: int = 7, max_annotators: int = 10) -> tuple[list[dict[str, Any]], int]:
        """Ratings-schema dicts ``{prompt, response, scores, annotator_ids}``: each non-empty
        completion rated by ``N ~ U{min_annotators … max_annotators}`` annotators (DFL: 7–10), ids
        ``"<type>-<j>"`` (j = position). Returns ``(records, skipped_empty)``: completions without
        a word are left out (the schema needs a non-empty response) and counted."""
        prompts, completions = _check_texts(prompts, completions)
        lo, hi = _count(min_annotators, "min_annotators"), _count(max_annotators, "max_annotators")
        if lo > hi:
            raise ValueError(f"min_annotators must be <= max_annotators ({hi}), got {lo}")
        g = _generator(generator)
        keep = [i for i, c in enumerate(completions) if completion_words(c)]
        p = [prompts[i] for i in keep]
        c = [completions[i] for i in keep]
        counts = torch.randint(lo, hi + 1, (len(keep),), generator=g).tolist()
        scores, types = self.sample_ratings(p, c, hi, g, return_types=True)
        names = self.type_names
        records = [{"prompt": p[i], "response": c[i],
                    "scores": [float(s) for s in scores[i, :k].tolist()],
                    "annotator_ids": [f"{names[t]}-{j}" for j, t in enumerate(types[i, :k].tolist())]}
                   for i, k in enumerate(counts)]
        return records, len(completions) - len(keep)

    def pair_records(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                     generator: torch.Generator, *, num_votes: int = 8) -> tuple[list[dict[str, Any]], int]:
        """Pairs-schema dicts ``{prompt, chosen, rejected, votes}`` from ``num_votes`` sampled votes
        per pair (:meth:`sample_votes`): ``chosen`` is the completion with more votes (a tie goes to
        ``a``), ``votes`` are 1 for an annotator preferring ``chosen``. Returns ``(records,
        skipped)``: pairs with an empty completion or two identical texts are left out and counted."""
        prompts, completions_a = _check_texts(prompts, completions_a, "completions_a")
        _, completions_b = _check_texts(prompts, completions_b, "completions_b")
        g = _generator(generator)
        keep = [i for i in range(len(prompts)) if completion_words(completions_a[i]) and completion_words(completions_b[i])
                and completions_a[i] != completions_b[i]]
        p = [prompts[i] for i in keep]
        a = [completions_a[i] for i in keep]
        b = [completions_b[i] for i in keep]
        votes = self.sample_votes(p, a, b, _count(num_votes, "num_votes"), g) if keep else torch.zeros(0, num_votes, dtype=torch.long)
        records = []
        for i, v in enumerate(votes.tolist()):
            a_wins = 2 * sum(v) >= len(v)
            records.append({"prompt": p[i], "chosen": a[i] if a_wins else b[i], "rejected": b[i] if a_wins else a[i],
                            "votes": v if a_wins else [1 - x for x in v]})
        return records, len(prompts) - len(keep)

    def sample_feedback(self, model, prompts: Sequence[str], *, seed: int = 0, samples_per_prompt: int = 2,
                        max_new_tokens: int = 24, temperature: float = 1.0, min_annotators: int = 7,
                        max_annotators: int = 10, num_votes: int = 8) -> Feedback:
        """DFL-style feedback on ``model``'s samples: ``samples_per_prompt ≥ 2`` completions per
        prompt (:meth:`generate`), every completion rated (:meth:`rating_records`) and consecutive
        completions of a prompt paired and voted on (:meth:`pair_records`)."""
        k = _count(samples_per_prompt, "samples_per_prompt", 2)
        prompts, _ = _check_texts(prompts, list(prompts))
        rep = [p for p in prompts for _ in range(k)]
        comps = self.generate(model, rep, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature)
        g = torch.Generator().manual_seed(_seed(seed) + 1)
        ratings, skipped = self.rating_records(rep, comps, g, min_annotators=min_annotators, max_annotators=max_annotators)
        pa = [(rep[i], comps[i], comps[i + 1]) for i in range(0, len(rep), k) for i in range(i, i + k - 1)]
        pairs, _ = self.pair_records([x[0] for x in pa], [x[1] for x in pa], [x[2] for x in pa], g, num_votes=num_votes)
        return Feedback(ratings, pairs, skipped)

    # ---- TRL convention -----------------------------------------------------------------------

    def reward_function(self) -> Callable[..., list[float]]:
        """``f(prompts, completions, **kwargs) -> list[float]``: the exact population mean rating
        (:meth:`mean_rating`), TRL's ``reward_funcs`` convention (plain texts or conversational
        message lists); ``f.__name__ == "text_world_mean_rating"``."""
        world = self

        def text_world_mean_rating(prompts, completions, **kwargs) -> list[float]:
            return [float(x) for x in world.mean_rating(prompts, completions).tolist()]

        return text_world_mean_rating


def _threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return float(threshold)


def build_tokenizer():
    """The text world's ``PreTrainedTokenizerFast`` (see :attr:`TextWorld.tokenizer`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(_WORD_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, _WORD_ID[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left", model_max_length=1024)
