"""``prefcore serve-rm``: a reward-model server for trainers that score over HTTP.

A trained ``prefcore train-rm`` run directory (text runs: bt, bt-margin, qrm, gmm, mean-var) is
served on FastAPI + uvicorn with four kinds of endpoint:

* ``POST /get_reward`` — OpenRLHF's remote reward model (``--remote_rm_url``):
  ``{"query": [prompt+response texts], "prompts": [...], "labels": [...]?}`` →
  ``{"rewards": [...], "scores": [...], "extra_logs": {"mean": [...], "q0.05": [...], ...}}``.
* ``POST /classify`` — the vLLM/SGLang classification schema verl's reward loop reads:
  ``{"model": ..., "input": str | [str]}`` → ``{"data": [{"index", "label", "probs", "num_classes"}],
  "usage": {...}}`` with the served utility as the **last** entry of ``probs``.
* ``POST /v1/reward`` — prefcore's own: prompts + responses (+ utilities) → per sample the
  utilities, the mean and the quantiles (qrm) or the mixture parameters (gmm, mean-var).
* ``GET /health``, ``GET /info``.

Requests from many clients are queued and scored together by one batcher thread
(:mod:`prefcore.serve.batcher`): up to ``max_batch_tokens`` padded tokens or ``max_wait_ms``
after the first waiting sample, length-grouped, one model call per batch. See
:mod:`prefcore.serve.app` for the schemas and errors, :mod:`prefcore.serve.client` for the client
that ``prefcore train-policy --reward_model http://HOST:PORT`` uses.
"""
from prefcore.serve.config import ServeConfig

__all__ = ["ServeConfig"]
