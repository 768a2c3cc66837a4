"""The served model and the cross-request batcher.

:class:`ServedModel` wraps a run's :class:`~prefcore.train.rm.scoring.RunScorer`: texts are
``prompt + "\\n\\n" + response`` (as the run embedded them), truncated from the left to
``max_length`` tokens so the pooled last token is the true end of the response; the qrm gate
reads the prompt alone. Pooling reads each row's own last token, so a sample's score does not
depend on which other samples share its batch (up to float rounding of the padded GEMMs).

:class:`Batcher`: every sample of every request goes into one queue; one worker thread takes the
first waiting sample, keeps collecting until the batch holds ``max_batch_tokens`` padded tokens
or ``max_wait_ms`` have passed, orders what it holds by length and cuts it into batches of at
most ``max_batch_tokens`` padded tokens (``rows × longest``; a longer single sample is a batch of
its own), and runs the model once per batch. An exception in a batch fails exactly that batch's
samples; the worker goes on with the next.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from prefcore import distributions as D

# Test hook (documented in the README's serve-rm section): a batch containing a text with this
# substring raises inside the model call, so tests can check that a model error fails only that
# batch. Read once at start; unset in normal use.
FAULT_ENV = "PREFCORE_SERVE_FAIL_ON"


@dataclass
class Sample:
    """One text to score: ``text`` (what the backbone reads), ``prompt`` (the qrm gate's input),
    ``ids`` and ``prompt_ids`` (token ids after truncation) and the future of its result row."""

    text: str
    prompt: str
    ids: list[int]
    prompt_ids: list[int]
    future: Future = field(default_factory=Future)


class ServedModel:
    """A train-rm run ready to score batches of :class:`Sample` (load with :meth:`load`)."""

    def __init__(self, scorer, max_length: int):
        self.scorer = scorer
        self.method: str = scorer.head_config["method"]
        self.max_length = max_length
        self.tokenizer = scorer.tokenizer
        self.fail_on = os.environ.get(FAULT_ENV) or None

    @classmethod
    def load(cls, run_dir: str, *, device: str = "cpu", max_length: int | None = None) -> ServedModel:
        from prefcore.train.rm.scoring import RunScorer

        scorer = RunScorer.load(run_dir, device=device)
        if scorer.backbone is None:
            raise ValueError(f"--reward_model {run_dir!r} was trained on features (synthetic default), so it cannot "
                             "score texts; serve a run trained with --backbone")
        return cls(scorer, max_length or scorer.max_length)

    @property
    def kind(self) -> str:
        """``scalar`` (bt, bt-margin), ``quantile`` (qrm) or ``mixture`` (gmm, mean-var)."""
        return {"bt": "scalar", "bt-margin": "scalar", "qrm": "quantile"}.get(self.method, "mixture")

    @property
    def taus(self) -> list[float] | None:
        return self.scorer.heads["quantile"].taus.tolist() if self.kind == "quantile" else None

    def tokenize(self, text: str) -> tuple[list[int], bool]:
        """Token ids of ``text`` as the model reads it (the last ``max_length``) and whether it was cut."""
        # the call RunScorer's feature extraction makes (the run's tokenizer truncates from the left)
        ids = self.tokenizer(text, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        cut = len(ids) == self.max_length and len(self.tokenizer(text, padding=False)["input_ids"]) > self.max_length
        return list(ids), cut

    @torch.no_grad()
    def _pooled(self, rows: Sequence[list[int]]) -> torch.Tensor:
        from prefcore.models.pooling import pooled_features
        from prefcore.train.rm.features import _backbone_device, _pad_right

        ids, mask = _pad_right(list(rows), _backbone_device(self.scorer.backbone))
        return pooled_features(self.scorer.backbone, ids, mask, "last").to(device="cpu", dtype=torch.float32)

    def score(self, samples: Sequence[Sample]):
        """The batch's reward distribution (or scalar rewards ``(B,)``), one model call."""
        if self.fail_on is not None and any(self.fail_on in s.text for s in samples):
            raise RuntimeError(f"model error injected by {FAULT_ENV} for this batch")
        feats = self._pooled([s.ids for s in samples])
        prompt_feats = self._pooled([s.prompt_ids for s in samples]) if self.kind == "quantile" else None
        return self.scorer.distribution_from_features(feats, prompt_feats)


LOW_QUANTILES = (0.05, 0.1, 0.25)


def split_rows(dist) -> list[dict[str, torch.Tensor]]:
    """A batch's distribution → one dict of tensors per sample (what :func:`stack_rows` rejoins;
    the batcher adds each sample's ``summary``)."""
    if isinstance(dist, torch.Tensor):
        return [{"value": v} for v in dist.reshape(-1)]
    if isinstance(dist, D.QuantileDistribution):
        return [{"values": v, "taus": dist.taus} for v in dist.values]
    return [{"logits": a, "mu": b, "log_sigma": c} for a, b, c in zip(dist.logits, dist.mu, dist.log_sigma)]


def summaries(dist, utility) -> list[dict[str, object]]:
    """Per sample: the mean, the served ``utility`` and the low quantiles (distributional models),
    computed once for the whole batch — what the hot endpoints answer with, so a request does no
    per-sample maths of its own."""
    mean = (dist if isinstance(dist, torch.Tensor) else dist.mean()).double().tolist()
    util = utility(dist).double().reshape(-1).tolist()
    if isinstance(dist, torch.Tensor):
        return [{"mean": m, "utility": u, "low_quantiles": None} for m, u in zip(mean, util)]
    dev = dist.values.device if isinstance(dist, D.QuantileDistribution) else dist.logits.device
    low = dist.quantile(torch.tensor(LOW_QUANTILES, dtype=torch.float64, device=dev)).double().tolist()
    return [{"mean": m, "utility": u, "low_quantiles": q} for m, u, q in zip(mean, util, low)]


def stack_rows(rows: Sequence[dict[str, torch.Tensor]]):
    """Per-sample rows of one model (:func:`split_rows`) → one distribution over them (or ``(B,)``)."""
    first = rows[0]
    if "value" in first:
        return torch.stack([r["value"] for r in rows])
    if "values" in first:
        return D.QuantileDistribution(torch.stack([r["values"] for r in rows]), first["taus"])
    return D.GaussianMixture(*(torch.stack([r[k] for r in rows]) for k in ("logits", "mu", "log_sigma")))


@dataclass
class BatchStats:
    samples: int = 0
    batches: int = 0
    failed_batches: int = 0
    largest_batch: int = 0


class Batcher:
    """Cross-request batching in one worker thread (module docstring). ``submit`` never blocks;
    ``close`` scores everything already queued, then stops the worker."""

    def __init__(self, model: ServedModel, utility, *, max_batch_tokens: int, max_wait_ms: float):
        self.model = model
        self.utility = utility
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: queue.Queue[Sample | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="prefcore-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, samples: Sequence[Sample]) -> list[Future]:
        for s in samples:
            self._queue.put(s)
        return [s.future for s in samples]

    def close(self, timeout: float | None = None) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _collect(self, first: Sample) -> tuple[list[Sample], bool]:
        """The first sample and what joins it within the wait and token budget; ``True`` when the
        stop sentinel was taken (the worker ends after this batch)."""
        pending, longest = [first], len(first.ids)
        deadline = time.monotonic() + self.max_wait_s
        while len(pending) * longest < self.max_batch_tokens:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return pending, True
            pending.append(item)
            longest = max(longest, len(item.ids))
        return pending, False

    def _run(self) -> None:
        from prefcore.train.rm.score import length_batches

        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            pending, stop = self._collect(first)
            for idx in length_batches([len(s.ids) for s in pending], self.max_batch_tokens):
                self._run_batch([pending[i] for i in idx])

    def _run_batch(self, batch: list[Sample]) -> None:
        try:
            dist = self.model.score(batch)
            rows = split_rows(dist)
            for row, summary, s in zip(rows, summaries(dist, self.utility), batch):
                row["summary"], row["n_tokens"] = summary, len(s.ids)
        except Exception as exc:  # a model error fails this batch's samples only
            with self._lock:
                self.stats.failed_batches += 1
            for s in batch:
                s.future.set_exception(exc)
            return
        with self._lock:
            self.stats.samples += len(batch)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for s, row in zip(batch, rows):
            s.future.set_result(row)
