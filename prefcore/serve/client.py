"""The client side of ``prefcore serve-rm``: what ``prefcore train-policy --reward_model
http://HOST:PORT[,http://HOST2:PORT2…]`` calls.

:class:`RemoteReward` posts ``(prompts, completions)`` to ``/v1/reward`` and rebuilds the reward
distribution from the answer — a :class:`~prefcore.distributions.QuantileDistribution` (qrm), a
:class:`~prefcore.distributions.GaussianMixture` (gmm, mean-var) or scalar rewards ``(B,)`` (bt) —
from the exact float32 parameters, so the policy applies its own utility and logs the same left
tail as with the in-process reward model. With several URLs the batch is split into contiguous
parts, one per server, sent concurrently (OpenRLHF's pattern). Each part is retried
``retries`` times on a connection error, a timeout or a 5xx answer, with exponential back-off;
a 4xx answer (a bad request) is raised at once with the server's message.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import torch

from prefcore import distributions as D


def parse_urls(spec: str) -> list[str]:
    """``"http://a:1,http://b:2"`` → the ``/v1/reward`` endpoint of each server."""
    urls = []
    for part in (p.strip() for p in spec.split(",")):
        u = urlsplit(part)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"reward_model: {part!r} is not an http(s)://HOST:PORT URL")
        path = u.path.rstrip("/") or "/v1/reward"
        urls.append(f"{u.scheme}://{u.netloc}{path}")
    return urls


def rebuild(results: Sequence[dict]):
    """``/v1/reward`` results → the distribution they describe (float32), or rewards ``(B,)``."""
    first = results[0]
    if "quantiles" in first:
        values = torch.tensor([r["quantiles"]["values"] for r in results], dtype=torch.float32)
        return D.QuantileDistribution(values, torch.tensor(first["quantiles"]["taus"], dtype=torch.float32))
    if "mixture" in first:
        return D.GaussianMixture(*(torch.tensor([r["mixture"][k] for r in results], dtype=torch.float32)
                                   for k in ("logits", "mu", "log_sigma")))
    return torch.tensor([r["mean"] for r in results], dtype=torch.float32)


class RemoteReward:
    """A reward callable ``(prompts, completions) -> distribution | (B,) tensor`` backed by one or
    more ``serve-rm`` servers (module docstring)."""

    def __init__(self, spec: str, *, timeout_s: float = 120.0, retries: int = 3, api_key: str | None = None):
        import httpx

        self.urls = parse_urls(spec)
        self.timeout_s = timeout_s
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self.__name__ = spec

    def _post(self, url: str, prompts: list[str], completions: list[str]) -> list[dict]:
        import httpx

        body = {"prompts": prompts, "responses": completions}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
            try:
                resp = self._client.post(url, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out …
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {_message(resp)}"
                continue
            if resp.status_code != 200:
                raise ValueError(f"reward_model {url}: HTTP {resp.status_code}: {_message(resp)}")
            results = resp.json()["results"]
            if len(results) != len(prompts):
                raise RuntimeError(f"reward_model {url}: {len(results)} results for {len(prompts)} samples")
            return results
        raise ConnectionError(f"reward_model {url}: no answer after {self.retries + 1} attempts ({last})")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kw):
        n = len(prompts)
        k = max(1, min(len(self.urls), n))
        bounds = [round(i * n / k) for i in range(k + 1)]
        parts = [(self.urls[i], list(prompts[bounds[i]:bounds[i + 1]]), list(completions[bounds[i]:bounds[i + 1]]))
                 for i in range(k)]
        with ThreadPoolExecutor(max_workers=k) as pool:
            answers = list(pool.map(lambda p: self._post(*p), parts))
        return rebuild([r for a in answers for r in a])

    def close(self) -> None:
        self._client.close()


def _message(resp) -> str:
    try:
        return str(resp.json().get("error", resp.text))
    except (json.JSONDecodeError, ValueError, AttributeError):
        return resp.text[:200]
