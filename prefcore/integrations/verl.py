"""verl reward function backed by ``prefcore serve-rm``.

verl's reward loop calls a user reward function per sample (``custom_reward_function.path`` /
``.name``; sync or async). This one sends ``prompt + "\\n\\n" + response`` to a serve-rm server's
``/classify`` endpoint (the vLLM/SGLang schema) and returns the served utility — the last entry
of ``probs`` — as verl's ``score``, with the distribution's mean as an extra field::

    prefcore serve-rm runs/rm-qrm --utility cvar:0.1 --port 8000 &
    export PREFCORE_RM_URL=http://127.0.0.1:8000
    python -m verl.trainer.main_ppo ... \\
        custom_reward_function.path=$(python -c "import prefcore.integrations.verl as m; print(m.__file__)") \\
        custom_reward_function.name=compute_score

The prompt is read from ``extra_info["prompt"]`` (or ``extra_info["question"]``, as verl's
example datasets store it); put the prompt text there in your dataset's preprocessing. The
server batches the concurrent per-sample requests of verl's reward workers.
"""
from __future__ import annotations

import os

URL_ENV = "PREFCORE_RM_URL"


def _prompt(extra_info: dict | None) -> str:
    info = extra_info or {}
    prompt = info.get("prompt", info.get("question"))
    if not isinstance(prompt, str):
        raise ValueError("extra_info must hold the prompt text under 'prompt' (or 'question'), got keys "
                         f"{sorted(info)}")
    return prompt


async def compute_score(data_source: str, solution_str: str, ground_truth: object = None,
                        extra_info: dict | None = None, **kwargs) -> dict:
    """``{"score": utility, "reward_mean": mean}`` of ``solution_str`` as the response to the
    prompt in ``extra_info``, from the server at ``$PREFCORE_RM_URL``."""
    import httpx

    url = os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"set {URL_ENV} to the serve-rm server, e.g. http://127.0.0.1:8000")
    body = {"input": f"{_prompt(extra_info)}\n\n{solution_str}"}
    async with httpx.AsyncClient(timeout=float(os.environ.get("PREFCORE_RM_TIMEOUT", "120"))) as client:
        resp = await client.post(url.rstrip("/") + "/classify", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"serve-rm at {url}: HTTP {resp.status_code}: {resp.text[:200]}")
    probs = resp.json()["data"][0]["probs"]
    return {"score": probs[-1], "reward_mean": probs[-2] if len(probs) > 1 else probs[-1]}
