"""``prefcore serve-rm``: real server processes on 127.0.0.1 (free ports), called by a real HTTP
client (httpx). Scores are compared with :class:`RunScorer`'s offline scores of the same texts;
the utilities with :mod:`prefcore.utility` applied to the offline distribution."""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prefcore.serve.process import ServerProcess  # noqa: E402
from prefcore.train.rm.scoring import RunScorer  # noqa: E402
from prefcore.utility import parse_utility  # noqa: E402
from python_tests.rm_runs import shared_runs, train_text_run  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    world, qrm, bt = shared_runs()
    gmm = train_text_run(world, tmp_path_factory.mktemp("gmm") / "gmm", "gmm")
    prompts = [r["prompt"] for r in world.records[:12]]
    responses = [r["response"] for r in world.records[:12]]
    return {"world": world, "qrm": qrm, "bt": bt, "gmm": gmm, "prompts": prompts, "responses": responses}


@pytest.fixture(scope="module")
def qrm_server(runs):
    with ServerProcess([str(runs["qrm"]), "--utility", "cvar:0.25", "--max_wait_ms", "20",
                        "--max_body_mb", "0.05"]) as server:
        yield server


@pytest.fixture(scope="module")
def gmm_server(runs):
    # the test hook: a batch holding a text with "BOOM" fails inside the model call
    with ServerProcess([str(runs["gmm"]), "--max_batch_tokens", "1"], env={"PREFCORE_SERVE_FAIL_ON": "BOOM"}) as server:
        yield server


@pytest.fixture(scope="module")
def bt_server(runs):
    with ServerProcess([str(runs["bt"]), "--api_key", "s3cret"]) as server:
        yield server


KEY = {"Authorization": "Bearer s3cret"}


def post(url: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url, content=content, headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=60, **kw)


def offline(run, prompts, responses):
    return RunScorer.load(str(run)).reward_distribution(prompts, responses)


# ---- scores equal the offline scorer's ----------------------------------------------------------

@pytest.mark.parametrize("method", ["qrm", "gmm", "bt"])
def test_v1_reward_equals_the_offline_scorer(runs, method, request):
    prompts, responses = runs["prompts"], runs["responses"]
    dist = offline(runs[method], prompts, responses)
    utilities = ["mean"] if method == "bt" else ["mean", "ce:2", "cvar:0.25", "mean-var:0.5", "quantile:0.1"]
    server = request.getfixturevalue(f"{method}_server")
    r = post(server.url + "/v1/reward", {"prompts": prompts, "responses": responses, "utilities": utilities}, headers=KEY)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    info = httpx.get(server.url + "/info", headers=KEY).json()
    assert len(res) == len(prompts) and info["method"] == method
    mean = dist if method == "bt" else dist.mean()
    torch.testing.assert_close(torch.tensor([x["mean"] for x in res]), mean.double(), **TOL, check_dtype=False)
    for spec in utilities:
        want = parse_utility(spec)(dist).double()
        torch.testing.assert_close(torch.tensor([x["utilities"][spec] for x in res], dtype=torch.float64), want, **TOL)
    if method == "qrm":
        torch.testing.assert_close(torch.tensor([x["quantiles"]["values"] for x in res]), dist.values.double(),
                                   **TOL, check_dtype=False)
        assert info["quantile_levels"] == pytest.approx(dist.taus.tolist())
    if method == "gmm":
        w = torch.tensor([x["mixture"]["weights"] for x in res])
        torch.testing.assert_close(w, torch.softmax(dist.logits.double(), -1), **TOL, check_dtype=False)
        torch.testing.assert_close(torch.tensor([x["mixture"]["sigma"] for x in res]), dist.log_sigma.double().exp(),
                                   **TOL, check_dtype=False)


def test_get_reward_speaks_openrlhf(runs, qrm_server):
    prompts, responses = runs["prompts"][:5], runs["responses"][:5]
    dist = offline(runs["qrm"], prompts, responses)
    queries = [p + r for p, r in zip(prompts, responses)]
    r = post(qrm_server.url + "/get_reward", {"query": queries, "prompts": prompts, "labels": [None] * 5})
    assert r.status_code == 200, r.text
    out = r.json()
    want = parse_utility("cvar:0.25")(dist).double()
    torch.testing.assert_close(torch.tensor(out["rewards"], dtype=torch.float64), want, **TOL)
    assert out["scores"] == out["rewards"]
    torch.testing.assert_close(torch.tensor(out["extra_logs"]["reward_mean"], dtype=torch.float64),
                               dist.mean().double(), **TOL)
    q05 = dist.quantile(torch.tensor([0.05], dtype=torch.float64)).double()[..., 0]
    torch.testing.assert_close(torch.tensor(out["extra_logs"]["reward_q0.05"], dtype=torch.float64), q05, **TOL)


def test_classify_speaks_vllm_and_puts_the_utility_last(runs, qrm_server):
    prompts, responses = runs["prompts"][:3], runs["responses"][:3]
    dist = offline(runs["qrm"], prompts, responses)
    texts = [f"{p}\n\n{r}" for p, r in zip(prompts, responses)]
    r = post(qrm_server.url + "/classify", {"model": "rm", "input": texts})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["model"] == "rm" and out["usage"]["prompt_tokens"] > 0
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    probs = torch.tensor([d["probs"] for d in out["data"]], dtype=torch.float64)
    q = dist.values.shape[-1]
    assert all(d["num_classes"] == q + 2 for d in out["data"])
    torch.testing.assert_close(probs[:, -1], parse_utility("cvar:0.25")(dist).double(), **TOL)  # what verl reads
    torch.testing.assert_close(probs[:, -2], dist.mean().double(), **TOL)
    torch.testing.assert_close(probs[:, :q], dist.values.double(), **TOL)
    one = post(qrm_server.url + "/classify", {"input": texts[1]}).json()  # a single string
    assert len(one["data"]) == 1 and one["data"][0]["probs"][-1] == pytest.approx(float(probs[1, -1]), abs=1e-5)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/reward", b'{"prompts": ["a"', 400, "not valid JSON"),
    ("/v1/reward", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/reward", {"responses": ["a"]}, 400, "missing field 'prompts'"),
    ("/v1/reward", {"prompts": "a", "responses": ["a"]}, 400, "field 'prompts' must be a list of strings"),
    ("/v1/reward", {"prompts": ["a"], "responses": [3]}, 400, r"field 'responses\[0\]' must be a string"),
    ("/v1/reward", {"prompts": ["a", "b"], "responses": ["a"]}, 400, "'prompts' and 'responses' must have the same length"),
    ("/v1/reward", {"prompts": ["a"], "responses": ["b"], "utilities": ["cvar:2"]}, 400, "utilities"),
    ("/get_reward", {"query": ["x y"], "prompts": ["x", "y"]}, 400, "'query' and 'prompts' must have the same length"),
    ("/get_reward", {"query": ["x y"], "prompts": ["z"]}, 400, r"'query\[0\]' does not start with 'prompts\[0\]'"),
    ("/get_reward", {"prompts": ["z"]}, 400, "missing field 'query'"),
    ("/classify", {"input": 5}, 400, "field 'input' must be a string or a list of strings"),
    ("/v1/reward", {"prompts": ["a"], "responses": ["b " * 40000]}, 413, "max_body_mb"),
])
def test_bad_requests_get_a_4xx_naming_the_field(qrm_server, path, body, status, message):
    r = post(qrm_server.url + path, body)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]), r.json()


def test_empty_lists_get_empty_answers(qrm_server):
    assert post(qrm_server.url + "/v1/reward", {"prompts": [], "responses": []}).json()["results"] == []
    assert post(qrm_server.url + "/get_reward", {"query": [], "prompts": []}).json()["rewards"] == []
    assert post(qrm_server.url + "/classify", {"input": []}).json()["data"] == []


def test_over_long_texts_are_truncated_as_in_training_and_counted(runs, qrm_server):
    before = httpx.get(qrm_server.url + "/info").json()["stats"]["truncated_texts"]
    long = " ".join(runs["responses"][:6])  # well over the run's max_length of 48 tokens
    prompts = [runs["prompts"][0], runs["prompts"][1]]
    responses = [long, runs["responses"][1]]
    r = post(qrm_server.url + "/v1/reward", {"prompts": prompts, "responses": responses})
    assert r.status_code == 200, r.text
    after = httpx.get(qrm_server.url + "/info").json()["stats"]["truncated_texts"]
    assert after - before == 1
    dist = offline(runs["qrm"], prompts, responses)  # RunScorer also keeps the end of the text
    torch.testing.assert_close(torch.tensor([x["mean"] for x in r.json()["results"]], dtype=torch.float64),
                               dist.mean().double(), **TOL)


# ---- under load ----------------------------------------------------------------------------------

def test_concurrent_one_sample_requests_each_get_their_own_answer_and_are_batched(runs, qrm_server):
    prompts, responses = runs["prompts"], runs["responses"]
    want = parse_utility("cvar:0.25")(offline(runs["qrm"], prompts, responses)).double()
    before = httpx.get(qrm_server.url + "/info").json()["stats"]
    jobs = [i % len(prompts) for i in range(64)]

    def one(i: int) -> float:
        r = post(qrm_server.url + "/get_reward", {"query": [prompts[i] + responses[i]], "prompts": [prompts[i]]})
        assert r.status_code == 200, r.text
        return r.json()["rewards"][0]

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, jobs))
    assert time.monotonic() - t0 < 60
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want[jobs], **TOL)
    after = httpx.get(qrm_server.url + "/info").json()["stats"]
    assert after["samples"] - before["samples"] == 64
    assert after["batches"] - before["batches"] < 64 and after["largest_batch"] > 1  # requests shared batches


def test_a_model_error_fails_only_its_batch_and_the_server_keeps_serving(runs, gmm_server):
    prompts, responses = runs["prompts"][:2], runs["responses"][:2]
    url = gmm_server.url
    before = httpx.get(url + "/info").json()["stats"]["failed_batches"]
    with ThreadPoolExecutor(2) as pool:  # the failing and a healthy request at the same time
        bad, good = pool.map(lambda body: post(url + "/v1/reward", body),
                             [{"prompts": ["x"], "responses": ["BOOM"]}, {"prompts": prompts, "responses": responses}])
    assert bad.status_code == 500 and "model error" in bad.json()["error"], bad.text
    assert good.status_code == 200 and len(good.json()["results"]) == 2, good.text
    assert httpx.get(url + "/info").json()["stats"]["failed_batches"] == before + 1
    assert post(url + "/v1/reward", {"prompts": prompts, "responses": responses}).status_code == 200


def test_api_key_is_required_when_set(bt_server):
    body = {"prompts": ["a"], "responses": ["b"]}
    assert httpx.get(bt_server.url + "/health").status_code == 200
    assert httpx.get(bt_server.url + "/info").status_code == 401
    assert post(bt_server.url + "/v1/reward", body).status_code == 401
    assert post(bt_server.url + "/v1/reward", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = post(bt_server.url + "/v1/reward", body, headers=KEY)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(runs):
    server = ServerProcess([str(runs["bt"]), "--max_wait_ms", "1500"]).start()
    try:
        result: dict = {}

        def call():
            result["r"] = post(server.url + "/v1/reward", {"prompts": ["a"], "responses": ["b"]})

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/info").json()["stats"]["requests"] < 1:  # until the server has it
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)  # it now waits in the batcher (1.5 s window)
        t.join(30)
        assert result["r"].status_code == 200 and len(result["r"].json()["results"]) == 1
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


# ---- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["/nonexistent/run"], "--reward_model '/nonexistent/run' has no heads.json"),
    (["BT", "--utility", "cvar:0.1"], "needs a distributional reward model"),
    (["QRM", "--utility", "ce:x"], "--utility"),
    (["QRM", "--max_batch_tokens", "0"], "--max_batch_tokens must be >= 1"),
    (["QRM", "--host", "not a host"], "--host must be an IP address"),
])
def test_cli_errors_are_one_line_exit_2(runs, args, message, capsys):
    from prefcore.cli import main

    args = [{"BT": str(runs["bt"]), "QRM": str(runs["qrm"])}.get(a, a) for a in args]
    assert main(["serve-rm", *args, "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefcore serve-rm: error:") and message in lines[0], lines


# ---- train-policy against a server ---------------------------------------------------------------

def test_train_policy_through_servers_equals_the_in_process_reward_model(runs, qrm_server, tmp_path):
    from prefcore.train.policy import PolicyConfig, train_policy
    from python_tests.test_train_policy_common import PROMPTS, make_policy, make_tokenizer, read_metrics

    kw = dict(num_generations=2, max_completion_length=6, per_device_train_batch_size=4, max_steps=3,
              learning_rate=1e-2, kl_coef=0.05, no_progress=True, save_steps=100, utility="cvar:0.25")

    def run(name: str, reward: str) -> list[dict]:
        cfg = PolicyConfig(out=str(tmp_path / name), **kw)
        train_policy(cfg, model=make_policy(), tokenizer=make_tokenizer(), prompts=PROMPTS, reward=reward)
        return read_metrics(tmp_path / name)

    local = run("local", str(runs["qrm"]))
    with ServerProcess([str(runs["qrm"]), "--max_batch_tokens", "64"]) as b:
        before = [httpx.get(s.url + "/info").json()["stats"]["samples"] for s in (qrm_server, b)]
        remote = run("remote", f"{qrm_server.url},{b.url}")  # each batch is split over both servers
        after = [httpx.get(s.url + "/info").json()["stats"]["samples"] for s in (qrm_server, b)]
    assert all(n1 > n0 for n0, n1 in zip(before, after))  # both servers scored part of the batches
    assert len(local) == len(remote) == 3
    timing = ("time", "tokens_per_s", "/s", "seconds")
    for lo, re_ in zip(local, remote):
        assert lo.keys() == re_.keys()
        for k, v in lo.items():
            if any(t in k for t in timing) or not isinstance(v, (int, float)):
                continue
            assert re_[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k


def test_verl_reward_function_returns_the_served_utility(runs, qrm_server, monkeypatch):
    import asyncio

    from prefcore.integrations.verl import compute_score

    prompt, response = runs["prompts"][3], runs["responses"][3]
    monkeypatch.setenv("PREFCORE_RM_URL", qrm_server.url)
    out = asyncio.run(compute_score("src", response, None, {"prompt": prompt}))
    dist = offline(runs["qrm"], [prompt], [response])
    assert out["score"] == pytest.approx(float(parse_utility("cvar:0.25")(dist)[0]), abs=1e-5)
    assert out["reward_mean"] == pytest.approx(float(dist.mean()[0]), abs=1e-5)
    with pytest.raises(ValueError, match="extra_info must hold the prompt"):
        asyncio.run(compute_score("src", response, None, {}))
