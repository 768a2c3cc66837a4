"""The HTTP API of ``prefcore serve-rm`` (FastAPI).

Schemas (all bodies JSON; every error is ``{"error": MESSAGE}`` with the status below):

``POST /get_reward`` (OpenRLHF ``--remote_rm_url``)
    in: ``{"query": [str], "prompts": [str], "labels": [...]?}``; ``query[i]`` is the full text
    (prompt followed by response), and the response scored is ``query[i]`` minus its leading
    ``prompts[i]``. out: ``{"rewards": [float], "scores": [float], "extra_logs": {"reward_mean":
    [float], "reward_q0.05": [...], "reward_q0.1": [...], "reward_q0.25": [...]}}`` — rewards and
    scores are the served utility; the quantile logs only for distributional models.
``POST /classify`` (the vLLM/SGLang classify schema verl's reward loop reads)
    in: ``{"model": str?, "input": str | [str]}``. A text is scored as it is (the model was trained
    on ``prompt + "\\n\\n" + response``, so send that form); a qrm model's gate reads the prompt,
    taken as the text before the first blank line (``"\\n\\n"``; the whole text if there is none).
    out: ``{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs",
    "num_classes"}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}`` where
    ``probs`` is ``[q_1 … q_Q, mean, utility]`` (qrm; levels in ``/info``), ``[mean, utility]``
    (gmm, mean-var) or ``[reward]`` (bt): the **last** entry is always the served utility, which
    verl reads as the score. ``label`` names the utility.
``POST /v1/reward`` (prefcore)
    in: ``{"prompts": [str], "responses": [str], "utilities": [str]?}`` (default: the served
    utility). out: ``{"model", "method", "results": [{"mean", "utilities": {spec: float},
    "quantiles": {"taus", "values"}} | {..., "mixture": {"logits", "mu", "log_sigma", "weights",
    "sigma"}}]}``; bt models give ``mean`` (the reward) and the ``mean`` utility only.
``GET /health`` → ``{"status": "ok"}`` (no key needed); ``GET /info`` → model, method, quantile
    levels, utilities, max length, batching settings and counters (requests, samples, batches,
    failed batches, truncated texts).

Errors: 400 for a body that is not JSON, a missing or mistyped field, lists of different
lengths, an empty text or a utility the model cannot give (the message names the field); 413 for
a body over ``--max_body_mb``; 401 without ``Authorization: Bearer KEY`` when ``--api_key`` is
set; 500 with the message when the model fails on a batch (only that batch's requests). Empty
lists give empty answers. Texts over ``max_length`` tokens keep their end (as in training) and
are counted in ``/info``.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' parameter
# annotations (``request: Request``, imported inside :func:`build_app`) when they are defined.
import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict

import torch

from prefcore.serve.batcher import LOW_QUANTILES, Batcher, Sample, ServedModel, stack_rows
from prefcore.serve.config import ServeConfig
from prefcore.utility import Utility, parse_utility


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _str_list(body: dict, name: str, *, allow_str: bool = False) -> list[str]:
    if name not in body:
        raise RequestError(400, f"missing field '{name}'")
    value = body[name]
    if allow_str and isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        want = "a string or a list of strings" if allow_str else "a list of strings"
        raise RequestError(400, f"field '{name}' must be {want}, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise RequestError(400, f"field '{name}[{i}]' must be a string, got {type(v).__name__}")
    return value


def _same_length(a: Sequence, b: Sequence, na: str, nb: str) -> None:
    if len(a) != len(b):
        raise RequestError(400, f"fields '{na}' and '{nb}' must have the same length, got {len(a)} and {len(b)}")


class Service:
    """What the endpoints share: the model, the batcher, the served utility and the counters."""

    def __init__(self, cfg: ServeConfig, model: ServedModel, batcher: Batcher):
        self.cfg = cfg
        self.model = model
        self.batcher = batcher
        self.utility: Utility = cfg.parsed_utility
        self.requests = 0
        self.truncated = 0
        self.max_body = int(cfg.max_body_mb * 2**20)

    # ---- input ----------------------------------------------------------------------------------

    def _samples(self, texts: Sequence[str], prompts: Sequence[str], field: str) -> list[Sample]:
        samples = []
        for i, (text, prompt) in enumerate(zip(texts, prompts)):
            ids, cut = self.model.tokenize(text)
            if not ids:
                raise RequestError(400, f"field '{field}[{i}]' tokenizes to zero tokens")
            prompt_ids = self.model.tokenize(prompt)[0] if self.model.kind == "quantile" else []
            if self.model.kind == "quantile" and not prompt_ids:
                raise RequestError(400, f"the prompt of '{field}[{i}]' tokenizes to zero tokens (the qrm gate reads it)")
            self.truncated += int(cut)
            samples.append(Sample(text, prompt, ids, prompt_ids))
        return samples

    async def score(self, texts: Sequence[str], prompts: Sequence[str], field: str) -> list[dict]:
        """Per text, its row (:func:`~prefcore.serve.batcher.split_rows`, with the batch-computed
        ``summary``), scored in batches shared with other requests."""
        samples = await asyncio.to_thread(self._samples, texts, prompts, field)
        futures = self.batcher.submit(samples)
        try:
            rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except Exception as exc:  # the model failed on a batch holding some of these samples
            raise RequestError(500, f"model error: {type(exc).__name__}: {exc}") from None
        return list(rows)

    def utilities(self, specs: list[str] | None) -> list[Utility]:
        if specs is None:
            return [self.utility]
        out = []
        for i, s in enumerate(specs):
            try:
                u = parse_utility(s, setting=f"utilities[{i}]")
            except ValueError as exc:
                raise RequestError(400, str(exc)) from None
            if self.model.kind == "scalar" and not u.is_risk_neutral:
                raise RequestError(400, f"utilities[{i}] = {s!r} needs a distributional model; this {self.model.method} "
                                        "model gives scalar rewards (use 'mean')")
            out.append(u)
        return out

    # ---- output ---------------------------------------------------------------------------------

    def low_quantiles(self, rows: Sequence[dict]) -> dict[str, list[float]]:
        if rows[0]["summary"]["low_quantiles"] is None:
            return {}
        return {f"reward_q{t:g}": [r["summary"]["low_quantiles"][i] for r in rows] for i, t in enumerate(LOW_QUANTILES)}

    def info(self) -> dict:
        return {"model": self.cfg.reward_model, "method": self.model.method, "kind": self.model.kind,
                "quantile_levels": self.model.taus, "utility": str(self.utility),
                "utilities": ["mean"] if self.model.kind == "scalar" else ["mean", "ce:λ", "mean-var:α", "cvar:α",
                                                                           "quantile:τ"],
                "max_length": self.model.max_length, "max_batch_tokens": self.cfg.max_batch_tokens,
                "max_wait_ms": self.cfg.max_wait_ms,
                "stats": {"requests": self.requests, "truncated_texts": self.truncated,
                          **asdict(self.batcher.stats)}}


def results(dist, utilities: Sequence[Utility]) -> list[dict]:
    """``/v1/reward``'s per-sample results for a distribution (or scalar rewards)."""
    from prefcore import distributions as D

    scalar = isinstance(dist, torch.Tensor)
    mean = (dist if scalar else dist.mean()).double().tolist()
    utils = {str(u): u(dist).double().tolist() for u in utilities}
    out = []
    for j in range(len(mean)):
        row: dict = {"mean": mean[j], "utilities": {k: v[j] for k, v in utils.items()}}
        if isinstance(dist, D.QuantileDistribution):
            row["quantiles"] = {"taus": dist.taus.double().tolist(), "values": dist.values[j].double().tolist()}
        elif not scalar:
            row["mixture"] = {"logits": dist.logits[j].double().tolist(), "mu": dist.mu[j].double().tolist(),
                              "log_sigma": dist.log_sigma[j].double().tolist(),
                              "weights": torch.softmax(dist.logits[j].double(), -1).tolist(),
                              "sigma": dist.log_sigma[j].double().exp().tolist()}
        out.append(row)
    return out


def build_app(service: Service):
    """The FastAPI application of ``service`` (the batcher is closed on shutdown)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has finished the in-flight requests (graceful shutdown); stop the worker
        await asyncio.to_thread(service.batcher.close)

    app = FastAPI(title="prefcore serve-rm", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        if service.cfg.api_key is not None and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {service.cfg.api_key}".encode()):
                return JSONResponse({"error": "missing or wrong 'Authorization: Bearer <api_key>' header"},
                                    status_code=401)
        if request.method == "POST":
            service.requests += 1
        return await call_next(request)

    async def body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.max_body:
            raise RequestError(413, f"request body of {int(length)} bytes exceeds --max_body_mb "
                                    f"({service.max_body} bytes)")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > service.max_body:
                raise RequestError(413, f"request body exceeds --max_body_mb ({service.max_body} bytes)")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise RequestError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
        return obj

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return service.info()

    @app.post("/v1/reward")
    async def v1_reward(request: Request):
        b = await body(request)
        prompts, responses = _str_list(b, "prompts"), _str_list(b, "responses")
        _same_length(prompts, responses, "prompts", "responses")
        specs = _str_list(b, "utilities") if b.get("utilities") is not None else None
        utilities = service.utilities(specs)
        out = {"model": service.cfg.reward_model, "method": service.model.method, "results": []}
        if prompts:
            from prefcore.train.rm.sources import response_text

            rows = await service.score([response_text(p, r) for p, r in zip(prompts, responses)], prompts, "responses")
            out["results"] = results(stack_rows(rows), utilities)
        return out

    @app.post("/get_reward")
    async def get_reward(request: Request):
        b = await body(request)
        queries, prompts = _str_list(b, "query"), _str_list(b, "prompts")
        _same_length(queries, prompts, "query", "prompts")
        if "labels" in b and b["labels"] is not None and (not isinstance(b["labels"], list) or len(b["labels"]) != len(queries)):
            raise RequestError(400, "field 'labels' must be a list as long as 'query'")
        if not queries:
            return {"rewards": [], "scores": [], "extra_logs": {}}
        from prefcore.train.rm.sources import response_text

        texts = []
        for i, (q, p) in enumerate(zip(queries, prompts)):
            if not q.startswith(p):
                raise RequestError(400, f"field 'query[{i}]' does not start with 'prompts[{i}]' (the query is the "
                                        "prompt followed by the response)")
            texts.append(response_text(p, q[len(p):]))
        rows = await service.score(texts, prompts, "query")
        rewards = [r["summary"]["utility"] for r in rows]
        return {"rewards": rewards, "scores": rewards,
                "extra_logs": {"reward_mean": [r["summary"]["mean"] for r in rows], **service.low_quantiles(rows)}}

    @app.post("/classify")
    async def classify(request: Request):
        b = await body(request)
        texts = _str_list(b, "input", allow_str=True)
        model_name = b.get("model") if isinstance(b.get("model"), str) else service.cfg.reward_model
        out = {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
               "model": model_name, "data": [],
               "usage": {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0}}
        if not texts:
            return out
        prompts = [t.split("\n\n", 1)[0] for t in texts]
        rows = await service.score(texts, prompts, "input")
        kind = service.model.kind
        probs = []
        for r in rows:
            head = r["values"].double().tolist() if kind == "quantile" else []
            tail = [r["summary"]["utility"]] if kind == "scalar" else [r["summary"]["mean"], r["summary"]["utility"]]
            probs.append([*head, *tail])
        out["data"] = [{"index": i, "label": str(service.utility), "probs": p, "num_classes": len(p)}
                       for i, p in enumerate(probs)]
        n_tokens = sum(r["n_tokens"] for r in rows)
        out["usage"] = {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0}
        return out

    return app
